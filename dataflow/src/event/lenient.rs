//! The lenient field reader: each field of an event either parses as the
//! type expected or is recorded as the JSON type it held, so that one pass
//! over the input finds every problem of an event.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use crate::time::{parse_rfc3339, Millis};

/// An object's entries, each value read leniently.
pub(super) type LenientMap<'a, V> = Lenient<Vec<(Cow<'a, str>, Lenient<V>)>>;

/// Unix timestamps below this are seconds; at or above it, milliseconds.
/// 10^11 seconds is the year 5138, and 10^11 milliseconds is March 1973.
const MILLIS_THRESHOLD: f64 = 1e11;

/// A field that either parsed as `T` or held some other JSON type, named in
/// the `Wrong` variant. A wrong value is skipped whole, never half-read.
pub(super) enum Lenient<T> {
    Ok(T),
    Wrong(&'static str),
}

/// Deserialises a value as `T`, and anything else as `Lenient::Wrong`.
///
/// It buffers nothing: `T`'s visitor sees the value once, and the types it
/// does not accept are consumed by the fallback visitor below.
pub(super) trait LenientVisit<'de>: Sized {
    fn visit_str(v: Cow<'de, str>) -> Option<Self> {
        let _ = v;
        None
    }
    fn visit_i64(v: i64) -> Option<Self> {
        let _ = v;
        None
    }
    fn visit_u64(v: u64) -> Option<Self> {
        let _ = v;
        None
    }
    fn visit_f64(v: f64) -> Option<Self> {
        let _ = v;
        None
    }
    fn visit_bool(v: bool) -> Option<Self> {
        let _ = v;
        None
    }
    fn visit_map<A: MapAccess<'de>>(map: A) -> Result<Option<Self>, A::Error> {
        drain_map(map).map(|()| None)
    }
}

fn drain_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

impl<'de, T: LenientVisit<'de>> Deserialize<'de> for Lenient<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: LenientVisit<'de>> Visitor<'de> for V<T> {
            type Value = Lenient<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(T::visit_str(Cow::Borrowed(v)).map_or(Lenient::Wrong("a string"), Lenient::Ok))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(T::visit_str(Cow::Owned(v.to_owned()))
                    .map_or(Lenient::Wrong("a string"), Lenient::Ok))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(T::visit_str(Cow::Owned(v)).map_or(Lenient::Wrong("a string"), Lenient::Ok))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(T::visit_i64(v).map_or(Lenient::Wrong("a number"), Lenient::Ok))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(T::visit_u64(v).map_or(Lenient::Wrong("a number"), Lenient::Ok))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                Ok(T::visit_f64(v).map_or(Lenient::Wrong("a number"), Lenient::Ok))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(T::visit_bool(v).map_or(Lenient::Wrong("a boolean"), Lenient::Ok))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Lenient::Wrong("null"))
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Lenient::Wrong("null"))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Lenient::Wrong("an array"))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                Ok(T::visit_map(map)?.map_or(Lenient::Wrong("an object"), Lenient::Ok))
            }
        }
        deserializer.deserialize_any(V(std::marker::PhantomData))
    }
}

impl<'de: 'a, 'a> LenientVisit<'de> for Cow<'a, str> {
    fn visit_str(v: Cow<'de, str>) -> Option<Self> {
        Some(v)
    }
}

impl LenientVisit<'_> for f64 {
    fn visit_i64(v: i64) -> Option<Self> {
        Some(v as f64)
    }
    fn visit_u64(v: u64) -> Option<Self> {
        Some(v as f64)
    }
    fn visit_f64(v: f64) -> Option<Self> {
        Some(v)
    }
}

/// A dimension value: strings are kept, numbers and booleans become their text.
pub(super) struct DimValue<'a>(pub(super) Cow<'a, str>);

impl<'de: 'a, 'a> LenientVisit<'de> for DimValue<'a> {
    fn visit_str(v: Cow<'de, str>) -> Option<Self> {
        Some(DimValue(v))
    }
    fn visit_i64(v: i64) -> Option<Self> {
        Some(DimValue(Cow::Owned(v.to_string())))
    }
    fn visit_u64(v: u64) -> Option<Self> {
        Some(DimValue(Cow::Owned(v.to_string())))
    }
    fn visit_f64(v: f64) -> Option<Self> {
        Some(DimValue(Cow::Owned(v.to_string())))
    }
    fn visit_bool(v: bool) -> Option<Self> {
        Some(DimValue(Cow::Owned(v.to_string())))
    }
}

/// A timestamp, already converted to milliseconds, or the reason it is bad.
pub(super) struct Timestamp(pub(super) Result<Millis, String>);

impl Timestamp {
    fn from_number(v: f64) -> Self {
        if !v.is_finite() || v < 0.0 {
            return Timestamp(Err("must be a non-negative Unix time".into()));
        }
        let ms = if v < MILLIS_THRESHOLD { v * 1000.0 } else { v };
        if ms > 253_402_300_799_999.0 {
            return Timestamp(Err("is after the year 9999".into()));
        }
        Timestamp(Ok(ms.round() as Millis))
    }
}

impl<'de> LenientVisit<'de> for Timestamp {
    fn visit_str(v: Cow<'de, str>) -> Option<Self> {
        Some(Timestamp(
            parse_rfc3339(&v).ok_or_else(|| format!("'{v}' is not an RFC 3339 time")),
        ))
    }
    fn visit_i64(v: i64) -> Option<Self> {
        Some(Timestamp::from_number(v as f64))
    }
    fn visit_u64(v: u64) -> Option<Self> {
        Some(Timestamp::from_number(v as f64))
    }
    fn visit_f64(v: f64) -> Option<Self> {
        Some(Timestamp::from_number(v))
    }
}

impl<'de: 'a, 'a> LenientVisit<'de> for Vec<(Cow<'a, str>, Lenient<DimValue<'a>>)> {
    fn visit_map<A: MapAccess<'de>>(map: A) -> Result<Option<Self>, A::Error> {
        collect_map(map).map(Some)
    }
}

impl<'de: 'a, 'a> LenientVisit<'de> for Vec<(Cow<'a, str>, Lenient<f64>)> {
    fn visit_map<A: MapAccess<'de>>(map: A) -> Result<Option<Self>, A::Error> {
        collect_map(map).map(Some)
    }
}

fn collect_map<'de, A, V>(mut map: A) -> Result<Vec<(Cow<'de, str>, V)>, A::Error>
where
    A: MapAccess<'de>,
    V: Deserialize<'de>,
{
    let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(4));
    while let Some(key) = map.next_key::<BorrowedKey<'de>>()? {
        entries.push((key.0, map.next_value()?));
    }
    Ok(entries)
}

/// A map key that borrows from the input when it has no escapes.
struct BorrowedKey<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for BorrowedKey<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = BorrowedKey<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(BorrowedKey(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(BorrowedKey(Cow::Owned(v.to_owned())))
            }
        }
        deserializer.deserialize_str(V)
    }
}

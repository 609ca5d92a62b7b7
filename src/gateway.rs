//! `tally gateway`: a stateless HTTP and WebSocket node of the cluster.
//!
//! It validates events and produces them to Kafka, answering `202` once the
//! brokers acknowledge; answers history from ClickHouse; and fans out live
//! values from Redis, subscribing only to the metrics its clients hold. It
//! keeps no state of its own, so any number can run behind a load balancer.
//!
//! It serves the metric definitions the workers record as active in
//! ClickHouse, and follows them within a second when a backfill ends; the
//! backfill's progress it reads from each worker process's share in Redis.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tally_connectors::bus::redis;
use tally_connectors::bus::redis::{Progress, RedisFeed};
use tally_connectors::kafka::{self, producer::KafkaProducer};
use tally_connectors::store::clickhouse::ClickHouseStore;
use tally_dataflow::fingerprint;
use tally_gateway::backend::{ClickHouseHistory, EventSink, KafkaEvents};
use tally_gateway::catalog::{Backfill, Catalog};
use tally_gateway::live::Hub;
use tally_gateway::ops::Ops;
use tally_gateway::Gateway;
use tracing::{info, warn};

use crate::{load_config, server_runtime, shutdown_signal, toml_string, GatewayArgs};

/// Runs until SIGTERM or Ctrl-C.
pub fn gateway(args: GatewayArgs) -> anyhow::Result<()> {
    let overrides: Vec<(&str, String)> = args
        .listen
        .map(|listen| ("server.listen", toml_string(&listen.to_string())))
        .into_iter()
        .collect();
    let config = Arc::new(load_config(args.config.as_deref(), &overrides)?);
    let runtime = server_runtime(&config)?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.server.listen)
            .await
            .with_context(|| format!("binding {}", config.server.listen))?;
        let address = listener.local_addr()?;
        // The job's metrics are the workers' to serve.
        let ops = Arc::new(Ops::new(None));
        let metrics = Arc::new(config.metrics.clone());
        let (feed, bus) =
            redis::subscribe(&config.redis, Arc::clone(&metrics), config.live.bus_queue)
                .context("configuring the Redis subscriber")?;
        let lateness = config.dataflow.revision_horizon();
        let catalog = Arc::new(Catalog::new(config.metrics.clone()));
        let hub = Hub::start(
            Arc::clone(&catalog),
            lateness,
            bus,
            Arc::clone(&ops),
            Some(Arc::new(feed.clone())),
        );
        let progress = Progress::new(&config.redis).context("configuring the Redis client")?;
        let producer =
            Arc::new(KafkaProducer::new(&config.kafka).context("configuring the Kafka producer")?);
        tokio::spawn(Arc::clone(&producer).watch());
        let store = ClickHouseStore::new(&config.clickhouse);
        let gateway = Arc::new(Gateway {
            config: Arc::clone(&config),
            catalog: Arc::clone(&catalog),
            events: Arc::new(KafkaEvents(Arc::clone(&producer))) as Arc<dyn EventSink>,
            history: Arc::new(ClickHouseHistory(store.clone())),
            hub,
            ops: Arc::clone(&ops),
        });
        // Ready once the topics and tables exist; each wait logs and retries.
        let readiness = {
            let (config, ops) = (Arc::clone(&config), Arc::clone(&ops));
            let catalog = Arc::clone(&catalog);
            tokio::spawn(async move {
                producer.set_partitions(kafka::ensure_topics(&config.kafka).await);
                store
                    .prepare(&config.metrics, config.backfill.keep_old)
                    .await;
                let mut follow = Follow {
                    store,
                    progress,
                    catalog,
                    feed,
                    processes: config.cluster.processes,
                };
                follow.look().await;
                ops.set_ready(true);
                info!("Kafka and ClickHouse are reachable; ready");
                follow.run().await;
            })
        };
        // Before the word that tally listens: see `shutdown_signal`.
        let shutdown = shutdown_signal();
        info!(%address, brokers = %config.kafka.brokers, "tally gateway is listening");
        // A line for scripts and tests that start the gateway on port 0.
        println!("listening on http://{address}");
        tally_gateway::serve(listener, gateway, shutdown).await;
        readiness.abort();
        info!("stopped cleanly");
        anyhow::Ok(())
    })
}

/// How often a gateway looks at the active metrics and the backfill.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);

/// Keeps a gateway's catalog to what the workers record.
struct Follow {
    store: ClickHouseStore,
    progress: Progress,
    catalog: Arc<Catalog>,
    feed: RedisFeed,
    processes: usize,
}

impl Follow {
    async fn run(&mut self) {
        loop {
            tokio::time::sleep(FOLLOW_EVERY).await;
            self.look().await;
        }
    }

    /// Takes the newest active metrics, if they changed, and the
    /// backfill's progress.
    async fn look(&mut self) {
        match self.store.active().await {
            Ok(Some(active)) => {
                let serving = self.catalog.active();
                if fingerprint::job(&active.metrics) != fingerprint::job(&serving) {
                    info!(
                        boundary = active.boundary,
                        "the active metrics changed; serving the new definitions"
                    );
                    let metrics = Arc::new(active.metrics);
                    self.catalog.activate(Arc::clone(&metrics));
                    self.feed.renew(metrics);
                }
            }
            // No worker has started yet: the configured ones.
            Ok(None) => {}
            Err(e) => warn!(error = %e, "cannot read the active metrics from ClickHouse"),
        }
        let shares = self.progress.read(self.processes).await;
        let backfill = Backfill::combine(
            shares
                .iter()
                .flatten()
                .filter_map(|share| serde_json::from_str::<Backfill>(share).ok()),
        );
        self.catalog.set_backfill(backfill);
    }
}

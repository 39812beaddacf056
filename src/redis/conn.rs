//! The connection to Redis: one server, a Redis Cluster, or the master a set of Sentinels
//! names. The tracker talks to all three alike, through `redis::aio::ConnectionLike`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo, SingleNodeRoutingInfo};
use redis::sentinel::{SentinelClient, SentinelServerType};

use redis::{
    AsyncConnectionConfig, Cmd, ConnectionInfo, ErrorKind, FromRedisValue, IntoConnectionInfo,
    Pipeline, RedisError, RedisFuture, RedisResult, ServerErrorKind, Value,
};

use super::events::Events;

/// How long connecting to one server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// A connection the tracker clones freely: each topology multiplexes one set of sockets
/// between its clones and remakes them when they break. Every call that finds the
/// connection broken, and every new master found through the Sentinels, is told to
/// [`events`](Self::events), so the renewal task registers lost leases again as soon as
/// the connection works, not a renewal period later.
#[derive(Clone)]
pub(super) struct Conn {
    topology: Topology,
    events: Arc<Events>,
}

#[derive(Clone)]
enum Topology {
    /// One server, reconnected by redis-rs's connection manager.
    Single(ConnectionManager),
    /// A Redis Cluster: each command goes to the master of its key's slot. Beside it, the
    /// masters and their slots as last checked.
    Cluster(ClusterConnection, Arc<Mutex<Option<Vec<SlotRange>>>>),
    /// The master the Sentinels name, asked again after a connection error.
    Sentinel(Arc<SentinelMaster>),
}

impl Conn {
    /// One server at `url`, connected on first use.
    pub(super) fn single(url: impl IntoConnectionInfo) -> RedisResult<Self> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let manager = ConnectionManager::new_lazy_with_config(client, config)?;
        Ok(Conn::of(Topology::Single(manager), Arc::default()))
    }

    /// A cluster reached first through `nodes` (any of its nodes; the rest are found),
    /// connected in the background.
    pub(super) fn cluster<T: IntoConnectionInfo>(
        nodes: impl IntoIterator<Item = T>,
    ) -> RedisResult<Self> {
        let nodes = nodes
            .into_iter()
            .map(IntoConnectionInfo::into_connection_info)
            .collect::<RedisResult<Vec<_>>>()?;
        let client = redis::cluster::ClusterClientBuilder::new(nodes)
            .retries(3)
            .max_retry_wait(500)
            .build()?;
        let config = redis::cluster::ClusterConfig::new().set_connection_timeout(CONNECT_TIMEOUT);
        let cluster = client.get_pending_async_connection_with_config(config);
        Ok(Conn::of(
            Topology::Cluster(cluster, Arc::default()),
            Arc::default(),
        ))
    }

    /// The master the Sentinels at `sentinels` know as `master_name`, looked up on first
    /// use.
    pub(super) fn sentinel<T: IntoConnectionInfo>(
        sentinels: impl IntoIterator<Item = T>,
        master_name: &str,
    ) -> RedisResult<Self> {
        if master_name.is_empty() {
            return Err(RedisError::from((
                ErrorKind::InvalidClientConfig,
                "the Sentinel master name is empty",
            )));
        }
        let sentinels = sentinels
            .into_iter()
            .map(IntoConnectionInfo::into_connection_info)
            .collect::<RedisResult<Vec<_>>>()?;
        let client = SentinelClient::build(
            sentinels.clone(),
            master_name.to_owned(),
            None,
            SentinelServerType::Master,
        )?;
        let events = Arc::<Events>::default();
        let master = SentinelMaster {
            lookup: tokio::sync::Mutex::new(client),
            current: Mutex::new(Current::default()),
            generations: AtomicU64::new(0),
            config: AsyncConnectionConfig::new().set_connection_timeout(Some(CONNECT_TIMEOUT)),
            sentinels,
            name: master_name.to_owned(),
            watching: AtomicBool::new(false),
            events: Arc::clone(&events),
        };
        Ok(Conn::of(Topology::Sentinel(Arc::new(master)), events))
    }

    fn of(topology: Topology, events: Arc<Events>) -> Self {
        Conn { topology, events }
    }

    /// What calls through this connection tell the renewal task.
    pub(super) fn events(&self) -> &Arc<Events> {
        &self.events
    }

    /// Whether this is a Redis Cluster.
    pub(super) fn is_cluster(&self) -> bool {
        matches!(self.topology, Topology::Cluster(..))
    }

    /// The master the Sentinels name, when they do.
    pub(super) fn sentinel_master(&self) -> Option<&Arc<SentinelMaster>> {
        match &self.topology {
            Topology::Sentinel(master) => Some(master),
            _ => None,
        }
    }

    /// Checks that the connection works: a `PING` to the server, or on a cluster, the
    /// slots' masters (`CLUSTER SLOTS`, from any node) and a `PING` to each. A slot that
    /// moved to another master since the last check (a promoted replica, a resharding)
    /// is told as a new connection: that master may lack leases of this replica.
    pub(super) async fn check(&self) -> RedisResult<()> {
        let Topology::Cluster(cluster, known) = &self.topology else {
            return redis::cmd("PING").query_async(&mut self.clone()).await;
        };
        let answer = async {
            let random = RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random);
            let mut slots = redis::cmd("CLUSTER");
            slots.arg("SLOTS");
            let slots = slot_masters(cluster.clone().route_command(slots, random).await?)?;
            let moved = {
                let mut known = known.lock().unwrap_or_else(PoisonError::into_inner);
                let moved = known.as_ref().is_some_and(|known| *known != slots);
                *known = Some(slots.clone());
                moved
            };
            if moved {
                tracing::info!("redis cluster slots moved to other masters");
                self.events.reconnected();
            }
            // The cluster client skips masters it has no connection to when it sends to
            // them all: each is asked by its address instead.
            let masters: std::collections::BTreeSet<(String, u16)> = slots
                .into_iter()
                .map(|range| (range.host, range.port))
                .collect();
            for (host, port) in masters {
                let routing =
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
                cluster
                    .clone()
                    .route_command(redis::cmd("PING"), routing)
                    .await?;
            }
            Ok(())
        };
        self.events.watch(answer).await
    }

    /// The servers a `SCAN` must walk to see every key: each master of a cluster, or
    /// the one server.
    pub(super) async fn masters(&self) -> RedisResult<Vec<Node>> {
        let Topology::Cluster(cluster, _) = &self.topology else {
            return Ok(vec![Node::Any]);
        };
        // Every master answers, each under its address.
        let routing = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
        let answers = cluster
            .clone()
            .route_command(redis::cmd("PING"), routing)
            .await?;
        let answers: BTreeMap<String, Value> = from_value(answers)?;
        answers
            .into_keys()
            .map(|address| {
                let (host, port) = address.rsplit_once(':').ok_or_else(|| {
                    RedisError::from((
                        ErrorKind::Client,
                        "a cluster node's address is not host:port",
                        address.clone(),
                    ))
                })?;
                let port = port.parse().map_err(|_| {
                    RedisError::from((
                        ErrorKind::Client,
                        "a cluster node's port is not a number",
                        address.clone(),
                    ))
                })?;
                Ok(Node::At {
                    host: host.to_owned(),
                    port,
                })
            })
            .collect()
    }

    /// Sends `cmd` to `node` (one of [`masters`](Self::masters)).
    pub(super) async fn query_on<T: FromRedisValue>(
        &self,
        node: &Node,
        cmd: Cmd,
    ) -> RedisResult<T> {
        match (&self.topology, node) {
            (Topology::Cluster(cluster, _), Node::At { host, port }) => {
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                });
                from_value(cluster.clone().route_command(cmd, routing).await?)
            }
            _ => cmd.query_async(&mut self.clone()).await,
        }
    }
}

/// Slots `start..=end`, served by the master at `host:port`.
#[derive(Clone, PartialEq, Eq)]
struct SlotRange {
    start: i64,
    end: i64,
    host: String,
    port: u16,
}

/// The slot ranges of a `CLUSTER SLOTS` answer and their masters, in slot order.
fn slot_masters(answer: Value) -> RedisResult<Vec<SlotRange>> {
    let unexpected =
        || RedisError::from((ErrorKind::Client, "an unexpected answer to CLUSTER SLOTS"));
    let entries: Vec<Vec<Value>> = from_value(answer)?;
    let mut ranges = Vec::with_capacity(entries.len());
    for entry in entries {
        let mut fields = entry.into_iter();
        let (Some(start), Some(end), Some(master)) = (fields.next(), fields.next(), fields.next())
        else {
            return Err(unexpected());
        };
        let master: Vec<Value> = from_value(master)?;
        let mut master = master.into_iter();
        let (Some(host), Some(port)) = (master.next(), master.next()) else {
            return Err(unexpected());
        };
        ranges.push(SlotRange {
            start: from_value(start)?,
            end: from_value(end)?,
            host: from_value(host)?,
            port: from_value(port)?,
        });
    }
    ranges.sort_by_key(|range| range.start);
    Ok(ranges)
}

/// One server of those [`Conn::masters`] lists.
pub(super) enum Node {
    /// Whichever server the connection talks to.
    Any,
    /// The cluster node at this address.
    At { host: String, port: u16 },
}

fn from_value<T: FromRedisValue>(value: Value) -> RedisResult<T> {
    Ok(T::from_redis_value(value)?)
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let Conn { topology, events } = self;
        let call = match topology {
            Topology::Single(conn) => conn.req_packed_command(cmd),
            Topology::Cluster(conn, _) => conn.req_packed_command(cmd),
            Topology::Sentinel(master) => {
                let master = Arc::clone(master);
                Box::pin(async move {
                    master
                        .call(|mut conn| async move { conn.req_packed_command(cmd).await })
                        .await
                })
            }
        };
        Box::pin(events.watch(call))
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        let Conn { topology, events } = self;
        let call = match topology {
            Topology::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Topology::Cluster(conn, _) => {
                let whole = !pipeline.is_transaction() && offset == 0 && count == pipeline.len();
                if whole {
                    Box::pin(by_slot(conn.clone(), pipeline))
                } else {
                    conn.req_packed_commands(pipeline, offset, count)
                }
            }
            Topology::Sentinel(master) => {
                let master = Arc::clone(master);
                Box::pin(async move {
                    master
                        .call(|mut conn| async move {
                            conn.req_packed_commands(pipeline, offset, count).await
                        })
                        .await
                })
            }
        };
        Box::pin(events.watch(call))
    }

    fn get_db(&self) -> i64 {
        match &self.topology {
            Topology::Single(conn) => conn.get_db(),
            Topology::Cluster(conn, _) => conn.get_db(),
            Topology::Sentinel(_) => 0,
        }
    }
}

/// A pipeline whose commands' keys lie in several slots, sent to a cluster as one pipeline
/// per slot (each to its master, all at once), the answers put back in the pipeline's
/// order. Commands without keys go with the first slot's.
async fn by_slot(conn: ClusterConnection, pipeline: &Pipeline) -> RedisResult<Vec<Value>> {
    let mut groups: Vec<(Vec<usize>, Pipeline)> = Vec::new();
    let mut by_slot: std::collections::HashMap<u16, usize> = Default::default();
    for (index, cmd) in pipeline.cmd_iter().enumerate() {
        let group = match first_key(cmd).map(slot_of) {
            Some(slot) => *by_slot.entry(slot).or_insert_with(|| {
                groups.push(Default::default());
                groups.len() - 1
            }),
            None if groups.is_empty() => {
                groups.push(Default::default());
                0
            }
            None => 0,
        };
        let (indices, sub) = &mut groups[group];
        indices.push(index);
        sub.add_command(cmd.clone());
    }
    if groups.len() <= 1 {
        let mut conn = conn;
        return conn.req_packed_commands(pipeline, 0, pipeline.len()).await;
    }
    let mut calls = tokio::task::JoinSet::new();
    for (group, (_, sub)) in groups.iter().enumerate() {
        let (mut conn, sub) = (conn.clone(), sub.clone());
        calls.spawn(async move { (group, conn.req_packed_commands(&sub, 0, sub.len()).await) });
    }
    let mut values = vec![Value::Nil; pipeline.len()];
    while let Some(done) = calls.join_next().await {
        let (group, answer) = done.map_err(|error| {
            RedisError::from((
                ErrorKind::Client,
                "a pipeline call failed",
                error.to_string(),
            ))
        })?;
        for (index, value) in groups[group].0.iter().zip(answer?) {
            values[*index] = value;
        }
    }
    Ok(values)
}

/// The first key `cmd` names: after the key count of a script call, the first argument of
/// any other command.
fn first_key(cmd: &Cmd) -> Option<Vec<u8>> {
    let args: Vec<&[u8]> = cmd
        .args_iter()
        .map(|arg| match arg {
            redis::Arg::Simple(arg) => arg,
            _ => &b""[..],
        })
        .collect();
    let name = args.first()?.to_ascii_uppercase();
    let script = [
        &b"EVAL"[..],
        b"EVALSHA",
        b"EVAL_RO",
        b"EVALSHA_RO",
        b"FCALL",
        b"FCALL_RO",
    ];
    if script.contains(&name.as_slice()) {
        let keys: u64 = std::str::from_utf8(args.get(2)?).ok()?.parse().ok()?;
        return (keys > 0)
            .then(|| args.get(3).map(|key| key.to_vec()))
            .flatten();
    }
    args.get(1).map(|key| key.to_vec())
}

/// The cluster slot of `key`: CRC16 (XMODEM) of its hash tag (the part between the first
/// `{` and the next `}`, when not empty) or of the whole key, modulo the slot count.
fn slot_of(key: Vec<u8>) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let close = key[open + 1..].iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &key[open + 1..open + 1 + close])
    });
    let mut crc: u16 = 0;
    for &byte in tagged.unwrap_or(&key) {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16_384
}

/// The master a set of Sentinels names: looked up on first use, and again after a
/// connection error, a `READONLY` answer (the server was demoted) or a call cut short by
/// the tracker's timeout (the server may be partitioned away), so a failover is followed.
pub(super) struct SentinelMaster {
    /// Asks the Sentinels; one lookup at a time.
    lookup: tokio::sync::Mutex<SentinelClient>,
    current: Mutex<Current>,
    generations: AtomicU64,
    config: AsyncConnectionConfig,
    /// The Sentinels and the master's name, to hear of failovers from them.
    sentinels: Vec<ConnectionInfo>,
    name: String,
    /// Whether a task listens for the Sentinels' `+switch-master`.
    watching: AtomicBool,
    events: Arc<Events>,
}

#[derive(Default)]
struct Current {
    /// The master's address, its connection, and the generation that made it.
    conn: Option<(String, MultiplexedConnection, u64)>,
    /// A call was cut short: ask the Sentinels whether the master is still this one.
    recheck: bool,
}

impl SentinelMaster {
    async fn call<'a, T, F, Fut>(&'a self, call: F) -> RedisResult<T>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = RedisResult<T>> + 'a,
    {
        let (conn, generation) = self.connection().await?;
        let mut unfinished = Unfinished {
            master: self,
            generation,
            armed: true,
        };
        let answer = call(conn).await;
        unfinished.armed = false;
        if let Err(error) = &answer {
            if needs_another_master(error) {
                let mut current = self.lock();
                if matches!(&current.conn, Some((.., made)) if *made == generation) {
                    current.conn = None;
                }
            }
        }
        answer
    }

    /// The current master's connection, asking the Sentinels first when there is none or
    /// it is in doubt.
    async fn connection(&self) -> RedisResult<(MultiplexedConnection, u64)> {
        if let Some(fresh) = self.fresh() {
            return Ok(fresh);
        }
        let mut sentinels = self.lookup.lock().await;
        if let Some(fresh) = self.fresh() {
            return Ok(fresh); // looked up while this call waited for the lock
        }
        let client = sentinels.async_get_client().await?;
        let address = client.get_connection_info().addr().to_string();
        {
            let mut current = self.lock();
            current.recheck = false;
            if let Some((known, conn, generation)) = &current.conn {
                if *known == address {
                    return Ok((conn.clone(), *generation));
                }
            }
        }
        let conn = client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await?;
        let generation = self.generations.fetch_add(1, Relaxed) + 1;
        let mut current = self.lock();
        if let Some((old, ..)) = &current.conn {
            tracing::warn!(old, new = address, "redis master moved (sentinel failover)");
        } else {
            tracing::info!(master = address, "redis master found through the sentinels");
        }
        current.conn = Some((address, conn.clone(), generation));
        current.recheck = false;
        drop(current);
        if generation > 1 {
            // A master that may lack leases this replica holds.
            self.events.reconnected();
        }
        Ok((conn, generation))
    }

    /// The Sentinels, to subscribe to their announcements.
    pub(super) fn sentinels(&self) -> &[ConnectionInfo] {
        &self.sentinels
    }

    /// The master's name, as the Sentinels announce it.
    pub(super) fn name(&self) -> &str {
        &self.name
    }

    /// Claims the listening for the Sentinels' `+switch-master`: `false` when a task
    /// listens already.
    pub(super) fn start_watching(&self) -> bool {
        !self.watching.swap(true, Relaxed)
    }

    /// Gives the listening up, for the next lease held to claim it again.
    pub(super) fn stop_watching(&self) {
        self.watching.store(false, Relaxed);
    }

    /// The Sentinels announced a new master, or may have while nobody listened: the next
    /// call asks them which it is.
    pub(super) fn in_doubt(&self) {
        self.lock().recheck = true;
    }

    fn fresh(&self) -> Option<(MultiplexedConnection, u64)> {
        let current = self.lock();
        match &current.conn {
            Some((_, conn, generation)) if !current.recheck => Some((conn.clone(), *generation)),
            _ => None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Current> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Marks the master in doubt when a call is dropped before it was answered.
struct Unfinished<'a> {
    master: &'a SentinelMaster,
    generation: u64,
    armed: bool,
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut current = self.master.lock();
            if matches!(&current.conn, Some((.., made)) if *made == self.generation) {
                current.recheck = true;
            }
        }
    }
}

/// Errors after which the connection is not worth keeping: it broke, or the server is not
/// the master any more.
fn needs_another_master(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_unrecoverable_error()
        || matches!(
            error.kind(),
            ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_hash_tag() {
        // Values from Redis's own `CLUSTER KEYSLOT`.
        assert_eq!(slot_of(b"foo".to_vec()), 12_182);
        assert_eq!(slot_of(b"somekey".to_vec()), 11_058);
        assert_eq!(slot_of(b"a{foo}:b".to_vec()), 12_182);
        assert_eq!(slot_of(b"{}foo".to_vec()), slot_of(b"{}foo".to_vec()));
        assert_ne!(slot_of(b"{}foo".to_vec()), slot_of(b"foo".to_vec()));
    }

    #[test]
    fn script_calls_are_routed_by_their_first_key() {
        let mut call = redis::cmd("EVALSHA");
        call.arg("0123")
            .arg(2)
            .arg("p{t:acme}:leases")
            .arg("p{t:acme}:tokens");
        assert_eq!(first_key(&call).as_deref(), Some(&b"p{t:acme}:leases"[..]));
        let mut keyless = redis::cmd("EVALSHA");
        keyless.arg("0123").arg(0).arg("argument");
        assert_eq!(first_key(&keyless), None);
        let mut get = redis::cmd("GET");
        get.arg("k");
        assert_eq!(first_key(&get).as_deref(), Some(&b"k"[..]));
    }

    #[test]
    fn bad_addresses_are_errors() {
        assert!(Conn::cluster(Vec::<String>::new()).is_err());
        assert!(Conn::cluster(["not a url"]).is_err());
        assert!(Conn::sentinel(Vec::<String>::new(), "main").is_err());
        assert!(Conn::sentinel(["redis://127.0.0.1:1"], "").is_err());
        assert!(Conn::sentinel(["http://example.com"], "main").is_err());
    }
}

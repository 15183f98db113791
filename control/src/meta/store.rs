//! Durable raft log and state machine in one redb file (`<data_dir>/meta.redb`).
//!
//! [`open_store`] opens (or creates) the file, creates every table, checks the schema version and
//! the cluster id, and loads the durable state machine into memory. It returns a [`LogStore`]
//! (openraft's `RaftLogStorage` + `RaftLogReader`) and a [`StateMachineStore`] (openraft's
//! `RaftStateMachine`, with [`SnapshotBuilder`]).
//!
//! Contracts honoured (see openraft's storage docs):
//! - every raft write (vote, append, truncate, purge) and every snapshot is one redb transaction
//!   committed with `Durability::Immediate` (fsync) on a blocking thread before the call
//!   returns, and the append callback is called only after that commit; writes are serialized
//!   by openraft's `&mut self`;
//! - the state machine is durable through the log: each applied batch writes the changed rows,
//!   the id counters, `last_applied` and the membership in one transaction committed *without*
//!   its own fsync (`Durability::None`). The next durable commit of the file — the next append,
//!   vote, purge or snapshot, all in the same redb file — makes it durable with everything
//!   before it, and a clean shutdown does too. A crash can only roll the state machine back to
//!   an earlier consistent `last_applied` (never tear a batch), and the entries after it are
//!   still in the durable log, so openraft applies them again once it learns they are
//!   committed: from the leader's next append, or at once on a leader. Logs are purged only
//!   below a snapshot, whose durable commit persists the state machine it was read from. This
//!   saves one fsync (and its wait) per metadata write, e.g. every checkpoint commit. A restart
//!   reloads the state machine (and with it the request-id dedup table);
//! - a snapshot is built from one read transaction (data, `last_applied` and membership agree),
//!   stored as "current" with a unique id; installing one replaces everything in one transaction.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, RwLock};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::MetaError;
use super::state::{
    CheckpointRecord, Counters, DedupEntry, Dirty, ExecutorRecord, JobRecord, MetaState, TaskRecord,
};
use super::{MasterNode, NodeId, TypeConfig};

/// Version of the on-disk layout (tables and the encoding of what they hold, log entries
/// included); a file with another version is refused. 2: `Command::SetJobState` names the state
/// it was planned against. 3: job history entries and `Command::SetJobState` carry a
/// [`Cause`](crate::job::Cause), and job records count their restarts. 4: task records carry
/// their cost and the lost executor they were unplaced from, and `Command::AllocateTaskIds`
/// the plan's costs. 5: members carry their data dir's incarnation, which the cluster table
/// holds. 6: members carry the start of their master that wrote them, which the cluster table
/// counts; job records keep the times of their latest restarts.
pub const SCHEMA_VERSION: u32 = 6;
/// File name of the metadata store inside a master's data dir.
pub const FILE_NAME: &str = "meta.redb";

type Bytes = &'static [u8];
const CLUSTER: TableDefinition<'_, &str, Bytes> = TableDefinition::new("cluster");
const RAFT_LOG: TableDefinition<'_, u64, Bytes> = TableDefinition::new("raft_log");
const RAFT_META: TableDefinition<'_, &str, Bytes> = TableDefinition::new("raft_meta");
const EXECUTORS: TableDefinition<'_, u64, Bytes> = TableDefinition::new("executors");
const JOBS: TableDefinition<'_, u64, Bytes> = TableDefinition::new("jobs");
const TASKS: TableDefinition<'_, u64, Bytes> = TableDefinition::new("tasks");
const CHECKPOINTS: TableDefinition<'_, u64, Bytes> = TableDefinition::new("checkpoints");
const DEDUP: TableDefinition<'_, u64, Bytes> = TableDefinition::new("dedup");
const SM_META: TableDefinition<'_, &str, Bytes> = TableDefinition::new("sm_meta");
const SM_SNAPSHOT: TableDefinition<'_, &str, Bytes> = TableDefinition::new("sm_snapshot");

const DATA_TABLES: [TableDefinition<'_, u64, Bytes>; 5] =
    [EXECUTORS, JOBS, TASKS, CHECKPOINTS, DEDUP];

const K_SCHEMA: &str = "schema_version";
const K_CLUSTER_ID: &str = "cluster_id";
const K_INCARNATION: &str = "incarnation";
const K_STARTS: &str = "starts";
const K_VOTE: &str = "vote";
const K_LAST_PURGED: &str = "last_purged";
const K_LAST_APPLIED: &str = "last_applied";
const K_MEMBERSHIP: &str = "membership";
const K_COUNTERS: &str = "counters";
const K_CURRENT: &str = "current";

type SE = StorageError<NodeId>;

/// Serialized state-machine snapshot: metadata plus the postcard-encoded [`MetaState`].
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, MasterNode>,
    data: Vec<u8>,
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_allocvec(v)
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(bytes)
}

fn io_err(e: impl std::error::Error + 'static) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

fn w_logs(e: impl std::error::Error + 'static) -> SE {
    StorageIOError::write_logs(AnyError::new(&e)).into()
}
fn r_logs(e: impl std::error::Error + 'static) -> SE {
    StorageIOError::read_logs(AnyError::new(&e)).into()
}
fn w_vote(e: impl std::error::Error + 'static) -> SE {
    StorageIOError::write_vote(AnyError::new(&e)).into()
}
fn r_vote(e: impl std::error::Error + 'static) -> SE {
    StorageIOError::read_vote(AnyError::new(&e)).into()
}
fn w_sm(e: impl std::error::Error + 'static) -> SE {
    StorageIOError::write_state_machine(AnyError::new(&e)).into()
}
fn w_snap(e: impl std::error::Error + 'static) -> SE {
    StorageIOError::write_snapshot(None, AnyError::new(&e)).into()
}
fn r_snap(e: impl std::error::Error + 'static) -> SE {
    StorageIOError::read_snapshot(None, AnyError::new(&e)).into()
}

/// A blocking task died (panicked or was cancelled).
#[derive(Debug, thiserror::Error)]
#[error("blocking storage task failed: {0}")]
struct JoinFailure(String);

/// Runs `f` on tokio's blocking pool (redb commits fsync and block the thread).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, redb::Error> + Send + 'static,
    map: fn(JoinFailure) -> SE,
    map_db: fn(redb::Error) -> SE,
) -> Result<T, SE> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(map_db),
        Err(e) => Err(map(JoinFailure(e.to_string()))),
    }
}

fn corrupt(what: &str, e: postcard::Error) -> redb::Error {
    redb::Error::Io(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("corrupt {what}: {e}"),
    ))
}

fn enc<T: Serialize>(what: &str, v: &T) -> Result<Vec<u8>, redb::Error> {
    encode(v).map_err(|e| corrupt(what, e))
}

/// Everything [`open_store`] returns.
pub struct OpenedStore {
    /// The raft log storage.
    pub log: LogStore,
    /// The durable state machine.
    pub state_machine: StateMachineStore,
    /// Shared, read-only view of the applied metadata (updated by the state machine).
    pub state: Arc<RwLock<MetaState>>,
    /// Changes whenever the state machine applied entries (other than only refused requests)
    /// or installed a snapshot: a receiver's `changed()` wakes once `state` moved on.
    pub applied: tokio::sync::watch::Receiver<u64>,
    /// One more handle on the redb file, so that its owner can close it deterministically.
    pub(super) file: Arc<Database>,
    /// This data dir's incarnation ([`MasterNode::incarnation`]), drawn when it was created.
    pub incarnation: u64,
    /// How many times this data dir has been opened, this time included
    /// ([`MasterNode::start`]).
    pub start: u64,
}

/// Opens (or creates) `<data_dir>/meta.redb` for cluster `cluster_id`.
///
/// Fails with [`MetaError::ClusterMismatch`] if the file belongs to another cluster and with
/// [`MetaError::SchemaMismatch`] if it was written by an incompatible version.
pub fn open_store(data_dir: &Path, cluster_id: &str) -> Result<OpenedStore, MetaError> {
    std::fs::create_dir_all(data_dir).map_err(|e| MetaError::Storage {
        context: format!("create data dir {}", data_dir.display()),
        message: e.to_string(),
    })?;
    let path = data_dir.join(FILE_NAME);
    let db = Database::create(&path).map_err(|e| MetaError::Storage {
        context: format!("open {}", path.display()),
        message: e.to_string(),
    })?;
    open_database(
        db,
        &path.display().to_string(),
        &data_dir.display().to_string(),
        cluster_id,
    )
}

/// [`open_store`] on an opened redb database: `file` names it in errors, `dir` in
/// [`MetaError::ClusterMismatch`].
fn open_database(
    db: Database,
    file: &str,
    dir: &str,
    cluster_id: &str,
) -> Result<OpenedStore, MetaError> {
    let storage = |context: &str, e: &dyn std::fmt::Display| MetaError::Storage {
        context: format!("{context} {file}"),
        message: e.to_string(),
    };
    let txn = db.begin_write().map_err(|e| storage("write", &e))?;
    let incarnation;
    let start;
    {
        let mut cluster = txn
            .open_table(CLUSTER)
            .map_err(|e| storage("open table in", &e))?;
        let found_schema = cluster
            .get(K_SCHEMA)
            .map_err(|e| storage("read", &e))?
            .map(|v| decode::<u32>(v.value()));
        match found_schema {
            None => {
                let v = encode(&SCHEMA_VERSION).map_err(|e| storage("encode", &e))?;
                cluster
                    .insert(K_SCHEMA, v.as_slice())
                    .map_err(|e| storage("write", &e))?;
            }
            Some(Ok(v)) if v == SCHEMA_VERSION => {}
            Some(Ok(v)) => {
                return Err(MetaError::SchemaMismatch {
                    found: v,
                    expected: SCHEMA_VERSION,
                });
            }
            Some(Err(e)) => return Err(storage("corrupt schema version in", &e)),
        }
        let found_cluster = cluster
            .get(K_CLUSTER_ID)
            .map_err(|e| storage("read", &e))?
            .map(|v| decode::<String>(v.value()));
        match found_cluster {
            None => {
                let v = encode(&cluster_id).map_err(|e| storage("encode", &e))?;
                cluster
                    .insert(K_CLUSTER_ID, v.as_slice())
                    .map_err(|e| storage("write", &e))?;
            }
            Some(Ok(found)) if found == cluster_id => {}
            Some(Ok(found)) => {
                return Err(MetaError::ClusterMismatch {
                    dir: dir.to_owned(),
                    found,
                    expected: cluster_id.to_owned(),
                });
            }
            Some(Err(e)) => return Err(storage("corrupt cluster id in", &e)),
        }
        let found_incarnation = cluster
            .get(K_INCARNATION)
            .map_err(|e| storage("read", &e))?
            .map(|v| decode::<u64>(v.value()));
        incarnation = match found_incarnation {
            Some(Ok(n)) => n,
            None => {
                // Never 0, which stands for "not known".
                let n = rand::random::<u64>().max(1);
                let v = encode(&n).map_err(|e| storage("encode", &e))?;
                cluster
                    .insert(K_INCARNATION, v.as_slice())
                    .map_err(|e| storage("write", &e))?;
                n
            }
            Some(Err(e)) => return Err(storage("corrupt incarnation in", &e)),
        };
        let found_starts = cluster
            .get(K_STARTS)
            .map_err(|e| storage("read", &e))?
            .map(|v| decode::<u64>(v.value()));
        start = match found_starts {
            None => 1,
            Some(Ok(n)) => n.saturating_add(1),
            Some(Err(e)) => return Err(storage("corrupt start count in", &e)),
        };
        let v = encode(&start).map_err(|e| storage("encode", &e))?;
        cluster
            .insert(K_STARTS, v.as_slice())
            .map_err(|e| storage("write", &e))?;
        for t in [RAFT_META, SM_META, SM_SNAPSHOT] {
            txn.open_table(t)
                .map_err(|e| storage("create table in", &e))?;
        }
        for t in [RAFT_LOG].into_iter().chain(DATA_TABLES) {
            txn.open_table(t)
                .map_err(|e| storage("create table in", &e))?;
        }
    }
    txn.commit().map_err(|e| storage("commit", &e))?;
    let db = Arc::new(db);
    let read = db.begin_read().map_err(|e| storage("read", &e))?;
    let (state, last_applied, membership) =
        load_state(&read).map_err(|e| storage("load state machine from", &e))?;
    drop(read);
    let state = Arc::new(RwLock::new(state));
    let file = db.clone();
    let (changed, applied) = tokio::sync::watch::channel(0);
    Ok(OpenedStore {
        file,
        log: LogStore { db: db.clone() },
        state_machine: StateMachineStore {
            db,
            state: state.clone(),
            last_applied,
            membership,
            changed,
        },
        state,
        applied,
        incarnation,
        start,
    })
}

type Loaded = (
    MetaState,
    Option<LogId<NodeId>>,
    StoredMembership<NodeId, MasterNode>,
);

/// Reads the whole state machine from one read transaction.
fn load_state(txn: &redb::ReadTransaction) -> Result<Loaded, redb::Error> {
    fn rows<T: DeserializeOwned>(
        txn: &redb::ReadTransaction,
        def: TableDefinition<'_, u64, Bytes>,
        what: &str,
    ) -> Result<Vec<(u64, T)>, redb::Error> {
        let table = txn.open_table(def)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (k, v) = row?;
            out.push((k.value(), decode(v.value()).map_err(|e| corrupt(what, e))?));
        }
        Ok(out)
    }
    let mut state = MetaState::default();
    state.executors = rows::<ExecutorRecord>(txn, EXECUTORS, "executor")?
        .into_iter()
        .map(|(_, r)| (r.id, r))
        .collect();
    state.jobs = rows::<JobRecord>(txn, JOBS, "job")?
        .into_iter()
        .map(|(_, r)| (r.id, r))
        .collect();
    state.tasks = rows::<TaskRecord>(txn, TASKS, "task")?
        .into_iter()
        .map(|(_, r)| (r.id, r))
        .collect();
    state.checkpoints = rows::<CheckpointRecord>(txn, CHECKPOINTS, "checkpoint")?
        .into_iter()
        .map(|(k, r)| (super::JobId(k), r))
        .collect();
    state.dedup = rows::<DedupEntry>(txn, DEDUP, "dedup entry")?
        .into_iter()
        .collect();
    let sm = txn.open_table(SM_META)?;
    if let Some(v) = sm.get(K_COUNTERS)? {
        state.counters = decode::<Counters>(v.value()).map_err(|e| corrupt("counters", e))?;
    }
    let last_applied = match sm.get(K_LAST_APPLIED)? {
        Some(v) => decode(v.value()).map_err(|e| corrupt("last_applied", e))?,
        None => None,
    };
    let membership = match sm.get(K_MEMBERSHIP)? {
        Some(v) => decode(v.value()).map_err(|e| corrupt("membership", e))?,
        None => StoredMembership::default(),
    };
    Ok((state, last_applied, membership))
}

/// The raft log (and vote) in redb. Cheap to clone; each clone is also a log reader.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    fn meta_value<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, redb::Error> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(RAFT_META)?;
        match table.get(key)? {
            Some(v) => Ok(Some(decode(v.value()).map_err(|e| corrupt(key, e))?)),
            None => Ok(None),
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, SE> {
        let bounds: (Bound<u64>, Bound<u64>) =
            (range.start_bound().cloned(), range.end_bound().cloned());
        let db = self.db.clone();
        blocking(
            move || {
                let txn = db.begin_read()?;
                let table = txn.open_table(RAFT_LOG)?;
                let mut out = Vec::new();
                for row in table.range(bounds)? {
                    let (_, v) = row?;
                    out.push(decode(v.value()).map_err(|e| corrupt("log entry", e))?);
                }
                Ok(out)
            },
            r_logs,
            r_logs,
        )
        .await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SE> {
        let last_purged: Option<LogId<NodeId>> = self.meta_value(K_LAST_PURGED).map_err(r_logs)?;
        let txn = self.db.begin_read().map_err(r_logs)?;
        let table = txn.open_table(RAFT_LOG).map_err(r_logs)?;
        let last = match table.last().map_err(r_logs)? {
            Some((_, v)) => {
                let e: Entry<TypeConfig> = decode(v.value()).map_err(r_logs)?;
                Some(e.log_id)
            }
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), SE> {
        let bytes = encode(vote).map_err(w_vote)?;
        let db = self.db.clone();
        blocking(
            move || {
                let txn = db.begin_write()?;
                txn.open_table(RAFT_META)?
                    .insert(K_VOTE, bytes.as_slice())?;
                txn.commit()?;
                Ok(())
            },
            w_vote,
            w_vote,
        )
        .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, SE> {
        self.meta_value(K_VOTE).map_err(r_vote)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), SE>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut rows = Vec::new();
        for e in entries {
            rows.push((e.log_id.index, encode(&e).map_err(w_logs)?));
        }
        let db = self.db.clone();
        let result = blocking(
            move || {
                let txn = db.begin_write()?;
                {
                    let mut table = txn.open_table(RAFT_LOG)?;
                    for (index, bytes) in &rows {
                        table.insert(*index, bytes.as_slice())?;
                    }
                }
                txn.commit()?;
                Ok(())
            },
            w_logs,
            w_logs,
        )
        .await;
        // The commit above is durable (fsync) before the callback tells openraft so.
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(io_err(e.clone())));
                Err(e)
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), SE> {
        let db = self.db.clone();
        blocking(
            move || {
                let txn = db.begin_write()?;
                txn.open_table(RAFT_LOG)?
                    .retain_in(log_id.index.., |_, _| false)?;
                txn.commit()?;
                Ok(())
            },
            w_logs,
            w_logs,
        )
        .await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), SE> {
        let bytes = encode(&log_id).map_err(w_logs)?;
        let db = self.db.clone();
        blocking(
            move || {
                let txn = db.begin_write()?;
                txn.open_table(RAFT_META)?
                    .insert(K_LAST_PURGED, bytes.as_slice())?;
                txn.open_table(RAFT_LOG)?
                    .retain_in(..=log_id.index, |_, _| false)?;
                txn.commit()?;
                Ok(())
            },
            w_logs,
            w_logs,
        )
        .await
    }
}

/// The durable metadata state machine.
pub struct StateMachineStore {
    db: Arc<Database>,
    state: Arc<RwLock<MetaState>>,
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, MasterNode>,
    /// Counts the changes of `state` for [`OpenedStore::applied`].
    changed: tokio::sync::watch::Sender<u64>,
}

/// One row change produced by an applied batch.
enum Row {
    Put(TableDefinition<'static, u64, Bytes>, u64, Vec<u8>),
    Delete(TableDefinition<'static, u64, Bytes>, u64),
}

/// Serializes the rows named by `dirty` from `state`.
fn dirty_rows(state: &MetaState, dirty: &Dirty) -> Result<Vec<Row>, postcard::Error> {
    let mut rows = Vec::new();
    fn put<K: Ord, T: Serialize>(
        rows: &mut Vec<Row>,
        def: TableDefinition<'static, u64, Bytes>,
        map: &BTreeMap<K, T>,
        key: &K,
        raw: u64,
    ) -> Result<(), postcard::Error> {
        match map.get(key) {
            Some(v) => rows.push(Row::Put(def, raw, encode(v)?)),
            None => rows.push(Row::Delete(def, raw)),
        }
        Ok(())
    }
    for id in &dirty.executors {
        put(&mut rows, EXECUTORS, &state.executors, id, id.0)?;
    }
    for id in &dirty.jobs {
        put(&mut rows, JOBS, &state.jobs, id, id.0)?;
    }
    for id in &dirty.tasks {
        put(&mut rows, TASKS, &state.tasks, id, id.0)?;
    }
    for id in &dirty.checkpoints {
        put(&mut rows, CHECKPOINTS, &state.checkpoints, id, id.0)?;
    }
    for id in &dirty.clients {
        put(&mut rows, DEDUP, &state.dedup, id, *id)?;
    }
    Ok(rows)
}

fn write_sm_meta(
    txn: &redb::WriteTransaction,
    counters: &Counters,
    last_applied: &Option<LogId<NodeId>>,
    membership: &StoredMembership<NodeId, MasterNode>,
) -> Result<(), redb::Error> {
    let mut sm = txn.open_table(SM_META)?;
    sm.insert(K_COUNTERS, enc("counters", counters)?.as_slice())?;
    sm.insert(
        K_LAST_APPLIED,
        enc("last_applied", last_applied)?.as_slice(),
    )?;
    sm.insert(K_MEMBERSHIP, enc("membership", membership)?.as_slice())?;
    Ok(())
}

impl StateMachineStore {
    /// A read-only view of the applied metadata.
    pub fn state(&self) -> Arc<RwLock<MetaState>> {
        self.state.clone()
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, MasterNode>), SE> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<super::CommandResponse>, SE>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut responses = Vec::new();
        let (rows, counters) = {
            // Never held across an await: released at the end of this block.
            let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
            for entry in entries {
                self.last_applied = Some(entry.log_id);
                let response = match entry.payload {
                    EntryPayload::Blank => super::CommandResponse::Internal,
                    EntryPayload::Normal(req) => state.apply(&req),
                    EntryPayload::Membership(m) => {
                        self.membership = StoredMembership::new(Some(entry.log_id), m);
                        super::CommandResponse::Internal
                    }
                };
                responses.push(response);
            }
            let dirty = state.take_dirty();
            (dirty_rows(&state, &dirty).map_err(w_sm)?, state.counters)
        };
        let last_applied = self.last_applied;
        let membership = self.membership.clone();
        let db = self.db.clone();
        blocking(
            move || {
                let mut txn = db.begin_write()?;
                // Durable through the log: see the module docs.
                txn.set_durability(Durability::None)?;
                for row in rows {
                    match row {
                        Row::Put(def, k, v) => {
                            txn.open_table(def)?.insert(k, v.as_slice())?;
                        }
                        Row::Delete(def, k) => {
                            txn.open_table(def)?.remove(k)?;
                        }
                    }
                }
                write_sm_meta(&txn, &counters, &last_applied, &membership)?;
                txn.commit()?;
                Ok(())
            },
            w_sm,
            w_sm,
        )
        .await?;
        // A refused request changes nothing a watcher acts on (only the dedup table); not
        // counting it keeps a leader whose step was refused from planning it again at once.
        if responses
            .iter()
            .any(|r| !matches!(r, super::CommandResponse::Rejected(_)))
        {
            self.changed.send_modify(|n| *n = n.wrapping_add(1));
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            db: self.db.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, SE> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, MasterNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), SE> {
        let data = snapshot.into_inner();
        let new_state: MetaState = decode(&data).map_err(r_snap)?;
        let all = Dirty {
            executors: new_state.executors.keys().copied().collect(),
            jobs: new_state.jobs.keys().copied().collect(),
            tasks: new_state.tasks.keys().copied().collect(),
            checkpoints: new_state.checkpoints.keys().copied().collect(),
            clients: new_state.dedup.keys().copied().collect(),
        };
        let rows = dirty_rows(&new_state, &all).map_err(w_snap)?;
        let stored = encode(&StoredSnapshot {
            meta: meta.clone(),
            data,
        })
        .map_err(w_snap)?;
        let counters = new_state.counters;
        let last_applied = meta.last_log_id;
        let membership = meta.last_membership.clone();
        let db = self.db.clone();
        {
            let membership = membership.clone();
            blocking(
                move || {
                    let txn = db.begin_write()?;
                    for def in DATA_TABLES {
                        txn.open_table(def)?.retain(|_, _| false)?;
                    }
                    for row in rows {
                        if let Row::Put(def, k, v) = row {
                            txn.open_table(def)?.insert(k, v.as_slice())?;
                        }
                    }
                    write_sm_meta(&txn, &counters, &last_applied, &membership)?;
                    txn.open_table(SM_SNAPSHOT)?
                        .insert(K_CURRENT, stored.as_slice())?;
                    txn.commit()?;
                    Ok(())
                },
                w_snap,
                w_snap,
            )
            .await?;
        }
        self.last_applied = last_applied;
        self.membership = membership;
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = new_state;
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SE> {
        let txn = self.db.begin_read().map_err(r_snap)?;
        let table = txn.open_table(SM_SNAPSHOT).map_err(r_snap)?;
        let Some(v) = table.get(K_CURRENT).map_err(r_snap)? else {
            return Ok(None);
        };
        let stored: StoredSnapshot = decode(v.value()).map_err(r_snap)?;
        Ok(Some(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        }))
    }
}

/// Stores `built` as the current snapshot unless the stored one is at least as new, and
/// returns the one that is current now. A snapshot is built from a read of the state while
/// the state machine goes on: a snapshot installed from the leader meanwhile (with the log
/// purged up to it) must not be replaced by the older one built from the earlier read.
fn keep_newer_snapshot(
    txn: &redb::WriteTransaction,
    built: StoredSnapshot,
) -> Result<StoredSnapshot, redb::Error> {
    let mut table = txn.open_table(SM_SNAPSHOT)?;
    let current: Option<StoredSnapshot> = match table.get(K_CURRENT)? {
        Some(v) => Some(decode(v.value()).map_err(|e| corrupt("snapshot", e))?),
        None => None,
    };
    if let Some(current) = current
        && current.meta.last_log_id >= built.meta.last_log_id
    {
        return Ok(current);
    }
    table.insert(K_CURRENT, enc("snapshot", &built)?.as_slice())?;
    Ok(built)
}

/// Builds snapshots from one consistent read transaction.
pub struct SnapshotBuilder {
    db: Arc<Database>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SE> {
        let db = self.db.clone();
        let nonce: u64 = rand::random();
        blocking(
            move || {
                let read = db.begin_read()?;
                let (state, last_applied, membership) = load_state(&read)?;
                drop(read);
                let data = enc("snapshot", &state)?;
                let snapshot_id = match last_applied {
                    Some(l) => format!("{}-{}-{nonce:016x}", l.leader_id, l.index),
                    None => format!("empty-{nonce:016x}"),
                };
                let meta = SnapshotMeta {
                    last_log_id: last_applied,
                    last_membership: membership,
                    snapshot_id,
                };
                let txn = db.begin_write()?;
                let kept = keep_newer_snapshot(&txn, StoredSnapshot { meta, data })?;
                txn.commit()?;
                Ok(Snapshot {
                    meta: kept.meta,
                    snapshot: Box::new(Cursor::new(kept.data)),
                })
            },
            w_snap,
            w_snap,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every open counts as a start of the data dir; a refused one does not. The
    /// incarnation stays the data dir's.
    #[test]
    fn reopen_after_drop_and_cluster_mismatch() {
        let dir = tempfile::TempDir::new().unwrap();
        let first = open_store(dir.path(), "a").unwrap();
        let (incarnation, start) = (first.incarnation, first.start);
        assert_eq!(start, 1);
        drop(first);
        let second = open_store(dir.path(), "a").unwrap();
        assert_eq!((second.incarnation, second.start), (incarnation, 2));
        drop(second);
        let err = open_store(dir.path(), "b").err().unwrap();
        assert!(matches!(err, MetaError::ClusterMismatch { .. }), "{err}");
        let third = open_store(dir.path(), "a").unwrap();
        assert_eq!((third.incarnation, third.start), (incarnation, 3));
    }

    /// A snapshot built from a read taken before a newer one was installed does not replace
    /// it: the newer one stays current, and is what the build hands back.
    #[test]
    fn a_built_snapshot_never_replaces_a_newer_one() {
        let dir = tempfile::TempDir::new().unwrap();
        let store = open_store(dir.path(), "a").unwrap();
        let at = |index: u64, data: &[u8]| StoredSnapshot {
            meta: SnapshotMeta {
                last_log_id: Some(openraft::LogId::new(
                    openraft::CommittedLeaderId::new(1, 1),
                    index,
                )),
                last_membership: Default::default(),
                snapshot_id: format!("s{index}"),
            },
            data: data.to_vec(),
        };
        let db = &store.file;
        let write = |s: StoredSnapshot| {
            let txn = db.begin_write().unwrap();
            let kept = keep_newer_snapshot(&txn, s).unwrap();
            txn.commit().unwrap();
            kept
        };
        assert_eq!(write(at(10, b"installed")).meta.snapshot_id, "s10");
        let kept = write(at(5, b"built from an older read"));
        assert_eq!(
            (kept.meta.snapshot_id.as_str(), &kept.data[..]),
            ("s10", &b"installed"[..])
        );
        assert_eq!(write(at(12, b"newer")).meta.snapshot_id, "s12");
    }

    struct Builder;

    impl openraft::testing::StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir>
        for Builder
    {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), SE> {
            let dir = tempfile::TempDir::new().map_err(w_logs)?;
            let store = open_store(dir.path(), "conformance").map_err(w_logs)?;
            Ok((dir, store.log, store.state_machine))
        }
    }

    /// openraft's own storage conformance suite (log, vote, purge, truncate, apply, snapshot).
    #[test]
    fn openraft_storage_conformance() {
        openraft::testing::Suite::test_all(Builder).unwrap();
    }

    /// A disk for redb that, like a real one after a power cut, keeps only what was synced:
    /// [`CrashableDisk::after_crash`] is the file as of its last `sync_data`.
    #[derive(Clone, Default)]
    struct CrashableDisk(Arc<std::sync::Mutex<DiskImage>>);

    #[derive(Default)]
    struct DiskImage {
        written: Vec<u8>,
        synced: Vec<u8>,
    }

    impl Debug for CrashableDisk {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("CrashableDisk")
        }
    }

    impl CrashableDisk {
        fn image(&self) -> std::sync::MutexGuard<'_, DiskImage> {
            self.0.lock().unwrap_or_else(|p| p.into_inner())
        }

        /// A new disk holding what this one would hold after a crash now.
        fn after_crash(&self) -> CrashableDisk {
            let synced = self.image().synced.clone();
            CrashableDisk(Arc::new(std::sync::Mutex::new(DiskImage {
                written: synced.clone(),
                synced,
            })))
        }

        /// Opens the metadata store on this disk.
        fn open(&self) -> OpenedStore {
            let db = redb::Builder::new()
                .create_with_backend(self.clone())
                .expect("redb opens a crashed image: a durable commit is never torn");
            open_database(db, "crashable disk", "crashable disk", "crash").unwrap()
        }
    }

    fn out_of_range() -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "out of range")
    }

    impl redb::StorageBackend for CrashableDisk {
        fn len(&self) -> Result<u64, std::io::Error> {
            Ok(self.image().written.len() as u64)
        }

        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
            let image = self.image();
            let start = usize::try_from(offset).map_err(|_| out_of_range())?;
            let end = start.checked_add(out.len()).ok_or_else(out_of_range)?;
            out.copy_from_slice(image.written.get(start..end).ok_or_else(out_of_range)?);
            Ok(())
        }

        fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
            let len = usize::try_from(len).map_err(|_| out_of_range())?;
            self.image().written.resize(len, 0);
            Ok(())
        }

        fn sync_data(&self) -> Result<(), std::io::Error> {
            let mut image = self.image();
            image.synced = image.written.clone();
            Ok(())
        }

        fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
            let mut image = self.image();
            let start = usize::try_from(offset).map_err(|_| out_of_range())?;
            let end = start.checked_add(data.len()).ok_or_else(out_of_range)?;
            image
                .written
                .get_mut(start..end)
                .ok_or_else(out_of_range)?
                .copy_from_slice(data);
            Ok(())
        }
    }

    /// Normal entries `indexes` of term 1, each submitting a job.
    fn submits(indexes: std::ops::RangeInclusive<u64>) -> Vec<Entry<TypeConfig>> {
        indexes
            .map(|index| Entry {
                log_id: openraft::testing::log_id(1, 1, index),
                payload: EntryPayload::Normal(super::super::MetaRequest {
                    id: super::super::RequestId {
                        client: 7,
                        seq: index,
                    },
                    command: super::super::Command::SubmitJob {
                        job_type: "sleep".into(),
                        spec: format!("tasks = {index}"),
                        at_ms: index,
                    },
                }),
            })
            .collect()
    }

    fn snapshot(store: &OpenedStore) -> MetaState {
        store
            .state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Applies skip their fsync: a crash right after one rolls the state machine back to a
    /// consistent earlier `last_applied`, the entries after it are still in the durable log,
    /// and applying them again rebuilds exactly the state before the crash. The next durable
    /// write of the log makes earlier applies durable too.
    #[tokio::test]
    async fn applies_are_durable_through_the_log() {
        use openraft::storage::RaftLogStorageExt;

        let disk = CrashableDisk::default();
        let mut store = disk.open();
        store.log.blocking_append(submits(1..=3)).await.unwrap();
        store.state_machine.apply(submits(1..=3)).await.unwrap();
        let before = snapshot(&store);
        assert_eq!(before.jobs.len(), 3);

        // A crash now loses the applies but none of the log.
        let crashed = disk.after_crash();
        drop(store);
        let mut store = crashed.open();
        let (applied, _) = store.state_machine.applied_state().await.unwrap();
        assert_eq!(applied, None, "the applies were not synced");
        assert!(snapshot(&store).jobs.is_empty());
        let log = store.log.try_get_log_entries(1..=3).await.unwrap();
        assert_eq!(log.len(), 3, "the log survives the crash");

        // Applying the log again rebuilds the same state machine.
        store.state_machine.apply(log).await.unwrap();
        assert_eq!(snapshot(&store), before);

        // A durable log write persists every apply before it: after a crash the state
        // machine is at entry 3, and entry 4 is to be applied again.
        store.log.blocking_append(submits(4..=4)).await.unwrap();
        store.state_machine.apply(submits(4..=4)).await.unwrap();
        let crashed = crashed.after_crash();
        drop(store);
        let mut store = crashed.open();
        let (applied, _) = store.state_machine.applied_state().await.unwrap();
        assert_eq!(applied.map(|l| l.index), Some(3));
        assert_eq!(snapshot(&store), before);

        // A clean shutdown makes the last apply durable as well.
        store.state_machine.apply(submits(4..=4)).await.unwrap();
        let four = snapshot(&store);
        drop(store);
        let mut store = crashed.after_crash().open();
        let (applied, _) = store.state_machine.applied_state().await.unwrap();
        assert_eq!(applied.map(|l| l.index), Some(4));
        assert_eq!(snapshot(&store), four);
    }
}

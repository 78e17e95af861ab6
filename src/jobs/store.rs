//! Where one bridge keeps its jobs: a redb database in `jobs.dir`
//! (`jobs.redb`), with bodies over [`SPOOL_OVER`] in files of their own
//! beside it (`bodies/`, `results/`). Every change is durable (fsync)
//! before the call that made it returns; changes that arrive together are
//! committed together by one writer thread (group commit), so that many
//! jobs share each fsync. Readers use their own read transactions.

use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc, Arc,
    },
};

use bytes::Bytes;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;
use tracing::warn;

use super::Record;

/// A body longer than this goes to a file of its own.
pub(crate) const SPOOL_OVER: usize = 1 << 20;

/// Most changes committed by one transaction.
const BATCH: usize = 512;

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const BODIES: TableDefinition<&str, &[u8]> = TableDefinition::new("bodies");
const RESULTS: TableDefinition<&str, &[u8]> = TableDefinition::new("results");
/// Scoped idempotency key -> job id.
const KEYS: TableDefinition<&str, &str> = TableDefinition::new("keys");

/// What can go wrong with the store.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum StoreError {
    /// Storing the job would pass `jobs.max_bytes`.
    #[error("the job store is full ({limit} bytes, jobs.max_bytes)")]
    Full { limit: u64 },
    /// The disk or the database failed; nothing of the change was kept.
    #[error("the job store failed: {0}")]
    Io(String),
    /// The writer thread is gone (the bridge is stopping).
    #[error("the job store is closed")]
    Closed,
    /// Another bridge changed the job since this one last wrote it: this
    /// bridge no longer holds it.
    #[error("the job was taken over by another bridge")]
    Conflict,
}

fn io_error(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

/// A job's result body.
pub(crate) enum ResultBody {
    /// Small enough to live in the database.
    Inline(Bytes),
    /// In its own file.
    File(PathBuf),
    /// In the cluster's object store, read as it is sent.
    Object(Box<async_nats::jetstream::object_store::Object>),
}

enum Write {
    /// A new job, with its request body (and its key, if any).
    Insert(Box<Record>, Bytes),
    /// The job's record changed.
    Put(Box<Record>),
    /// The job ended: its record, its result body if it has one; the
    /// request body is dropped.
    Finish(Box<Record>, Option<Bytes>),
    /// Forget the job.
    Purge(String),
}

struct Op {
    write: Write,
    done: oneshot::Sender<Result<(), StoreError>>,
}

struct Inner {
    db: Database,
    dir: PathBuf,
    /// Bytes charged (see `Record::charge`); the writer alone changes it.
    stored: AtomicU64,
    max_bytes: u64,
    /// Transactions committed (each one fsync), and changes they held.
    commits: AtomicU64,
    changes: AtomicU64,
}

/// The job store; cheap to clone.
#[derive(Clone)]
pub(crate) struct Store {
    inner: Arc<Inner>,
    tx: mpsc::Sender<Op>,
}

impl Store {
    /// Opens (or creates) the store in `dir`, with every job it holds.
    /// Files left by a change that never committed are removed.
    pub(crate) fn open(dir: &Path, max_bytes: u64) -> Result<(Store, Vec<Record>), StoreError> {
        for sub in ["bodies", "results"] {
            fs::create_dir_all(dir.join(sub)).map_err(|e| {
                StoreError::Io(format!("cannot create {}: {e}", dir.join(sub).display()))
            })?;
        }
        let path = dir.join("jobs.redb");
        let db = Database::create(&path)
            .map_err(|e| StoreError::Io(format!("cannot open {}: {e}", path.display())))?;
        init_tables(&db)?;
        let records = all_records(&db)?;
        let stored = records.iter().map(Record::charge).sum();
        remove_orphans(dir, &records);
        let inner = Arc::new(Inner {
            db,
            dir: dir.to_owned(),
            stored: AtomicU64::new(stored),
            max_bytes,
            commits: AtomicU64::new(0),
            changes: AtomicU64::new(0),
        });
        let (tx, rx) = mpsc::channel();
        let writer = inner.clone();
        std::thread::Builder::new()
            .name("wsbridge-jobs".into())
            .spawn(move || write_loop(&writer, &rx))
            .map_err(io_error)?;
        Ok((Store { inner, tx }, records))
    }

    /// Transactions committed (one fsync each), and the changes they
    /// held: their ratio is what group commit saves.
    pub(crate) fn commits(&self) -> (u64, u64) {
        (
            self.inner.commits.load(Ordering::Relaxed),
            self.inner.changes.load(Ordering::Relaxed),
        )
    }

    /// Bytes charged against `jobs.max_bytes`.
    pub(crate) fn stored(&self) -> u64 {
        self.inner.stored.load(Ordering::Relaxed)
    }

    async fn submit(&self, write: Write) -> Result<(), StoreError> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Op { write, done })
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Stores a new job durably; `Full` leaves nothing behind.
    pub(crate) async fn insert(&self, record: &Record, body: Bytes) -> Result<(), StoreError> {
        self.submit(Write::Insert(Box::new(record.clone()), body))
            .await
    }

    /// Stores a changed record durably.
    pub(crate) async fn put(&self, record: &Record) -> Result<(), StoreError> {
        self.submit(Write::Put(Box::new(record.clone()))).await
    }

    /// Stores a finished job and its result body durably.
    pub(crate) async fn finish(
        &self,
        record: &Record,
        result: Option<Bytes>,
    ) -> Result<(), StoreError> {
        self.submit(Write::Finish(Box::new(record.clone()), result))
            .await
    }

    /// Forgets a job, its bodies and its key.
    pub(crate) async fn purge(&self, id: &str) -> Result<(), StoreError> {
        self.submit(Write::Purge(id.to_owned())).await
    }

    /// Runs a read on the blocking pool.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(io_error)?
    }

    /// A job's record.
    pub(crate) async fn get(&self, id: &str) -> Result<Option<Record>, StoreError> {
        let id = id.to_owned();
        self.read(move |inner| {
            let txn = inner.db.begin_read().map_err(io_error)?;
            let table = txn.open_table(JOBS).map_err(io_error)?;
            let row = table.get(id.as_str()).map_err(io_error)?;
            row.map(|v| serde_json::from_slice(v.value()).map_err(io_error))
                .transpose()
        })
        .await
    }

    /// The job a scoped idempotency key names.
    pub(crate) async fn by_key(&self, key: &str) -> Result<Option<String>, StoreError> {
        let key = key.to_owned();
        self.read(move |inner| {
            let txn = inner.db.begin_read().map_err(io_error)?;
            let table = txn.open_table(KEYS).map_err(io_error)?;
            let row = table.get(key.as_str()).map_err(io_error)?;
            Ok(row.map(|v| v.value().to_owned()))
        })
        .await
    }

    /// A live job's request body.
    pub(crate) async fn body(&self, record: &Record) -> Result<Bytes, StoreError> {
        let (id, spooled) = (record.id.clone(), record.body_spooled);
        self.read(move |inner| {
            if spooled {
                return fs::read(inner.dir.join("bodies").join(&id))
                    .map(Bytes::from)
                    .map_err(io_error);
            }
            let txn = inner.db.begin_read().map_err(io_error)?;
            let table = txn.open_table(BODIES).map_err(io_error)?;
            let row = table.get(id.as_str()).map_err(io_error)?;
            Ok(row.map_or_else(Bytes::new, |v| Bytes::copy_from_slice(v.value())))
        })
        .await
    }

    /// A finished job's result body.
    pub(crate) async fn result(&self, record: &Record) -> Result<ResultBody, StoreError> {
        let id = record.id.clone();
        if record.outcome.as_ref().is_some_and(|o| o.spooled) {
            return Ok(ResultBody::File(self.inner.dir.join("results").join(id)));
        }
        self.read(move |inner| {
            let txn = inner.db.begin_read().map_err(io_error)?;
            let table = txn.open_table(RESULTS).map_err(io_error)?;
            let row = table.get(id.as_str()).map_err(io_error)?;
            Ok(ResultBody::Inline(row.map_or_else(Bytes::new, |v| {
                Bytes::copy_from_slice(v.value())
            })))
        })
        .await
    }
}

fn init_tables(db: &Database) -> Result<(), StoreError> {
    let txn = db.begin_write().map_err(io_error)?;
    {
        txn.open_table(JOBS).map_err(io_error)?;
        txn.open_table(BODIES).map_err(io_error)?;
        txn.open_table(RESULTS).map_err(io_error)?;
        txn.open_table(KEYS).map_err(io_error)?;
    }
    txn.commit().map_err(io_error)
}

fn all_records(db: &Database) -> Result<Vec<Record>, StoreError> {
    let txn = db.begin_read().map_err(io_error)?;
    let table = txn.open_table(JOBS).map_err(io_error)?;
    let mut records = Vec::new();
    for row in table.iter().map_err(io_error)? {
        let (key, value) = row.map_err(io_error)?;
        match serde_json::from_slice::<Record>(value.value()) {
            Ok(r) => records.push(r),
            Err(e) => warn!(job = key.value(), error = %e, "a stored job cannot be read; skipped"),
        }
    }
    Ok(records)
}

/// Spool files with no job that refers to them: a change that wrote its
/// file and crashed before its commit.
fn remove_orphans(dir: &Path, records: &[Record]) {
    use std::collections::HashSet;
    let bodies: HashSet<&str> = records
        .iter()
        .filter(|r| r.body_spooled && !r.state.finished())
        .map(|r| r.id.as_str())
        .collect();
    let results: HashSet<&str> = records
        .iter()
        .filter(|r| r.outcome.as_ref().is_some_and(|o| o.spooled))
        .map(|r| r.id.as_str())
        .collect();
    for (sub, keep) in [("bodies", bodies), ("results", results)] {
        let Ok(entries) = fs::read_dir(dir.join(sub)) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if !keep.contains(name.to_string_lossy().as_ref()) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

/// Writes `bytes` to `path` and flushes it to the disk.
fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write as _;
    let mut file = fs::File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// The writer thread: takes every change waiting, commits them in one
/// transaction, then tells each its outcome.
fn write_loop(inner: &Inner, rx: &mpsc::Receiver<Op>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let outcomes = commit(inner, &batch);
        for (op, outcome) in batch.into_iter().zip(outcomes) {
            let _ = op.done.send(outcome);
        }
    }
}

/// Files written before the commit, and removed after it (or, if it
/// failed, the ones written for it).
#[derive(Default)]
struct Files {
    written: Vec<PathBuf>,
    remove: Vec<PathBuf>,
}

/// One transaction for `batch`; each change's outcome, in order.
fn commit(inner: &Inner, batch: &[Op]) -> Vec<Result<(), StoreError>> {
    let mut files = Files::default();
    let mut outcomes: Vec<Result<(), StoreError>> = Vec::with_capacity(batch.len());
    let mut stored = inner.stored.load(Ordering::Relaxed);
    let result = (|| -> Result<(), StoreError> {
        let txn = inner.db.begin_write().map_err(io_error)?;
        {
            let mut tables = Tables {
                jobs: txn.open_table(JOBS).map_err(io_error)?,
                bodies: txn.open_table(BODIES).map_err(io_error)?,
                results: txn.open_table(RESULTS).map_err(io_error)?,
                keys: txn.open_table(KEYS).map_err(io_error)?,
            };
            for op in batch {
                let outcome = apply(inner, &mut tables, &op.write, &mut stored, &mut files);
                outcomes.push(outcome);
            }
        }
        if !files.written.is_empty() {
            // The new files' names, durable before the rows that refer to them.
            for sub in ["bodies", "results"] {
                fs::File::open(inner.dir.join(sub))
                    .and_then(|d| d.sync_all())
                    .map_err(io_error)?;
            }
        }
        txn.commit().map_err(io_error)
    })();
    match result {
        Ok(()) => {
            inner.stored.store(stored, Ordering::Relaxed);
            inner.commits.fetch_add(1, Ordering::Relaxed);
            inner
                .changes
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            for path in files.remove {
                let _ = fs::remove_file(path);
            }
            outcomes
        }
        Err(e) => {
            warn!(error = %e, "a job store commit failed; its changes were not kept");
            for path in files.written {
                let _ = fs::remove_file(path);
            }
            batch.iter().map(|_| Err(e.clone())).collect()
        }
    }
}

struct Tables<'t> {
    jobs: redb::Table<'t, &'static str, &'static [u8]>,
    bodies: redb::Table<'t, &'static str, &'static [u8]>,
    results: redb::Table<'t, &'static str, &'static [u8]>,
    keys: redb::Table<'t, &'static str, &'static str>,
}

impl Tables<'_> {
    fn record(&self, id: &str) -> Result<Option<Record>, StoreError> {
        let row = self.jobs.get(id).map_err(io_error)?;
        row.map(|v| serde_json::from_slice(v.value()).map_err(io_error))
            .transpose()
    }

    fn put(&mut self, record: &Record) -> Result<(), StoreError> {
        let json = serde_json::to_vec(record).map_err(io_error)?;
        self.jobs
            .insert(record.id.as_str(), json.as_slice())
            .map_err(io_error)?;
        Ok(())
    }
}

/// One change inside the batch's transaction.
fn apply(
    inner: &Inner,
    t: &mut Tables<'_>,
    write: &Write,
    stored: &mut u64,
    files: &mut Files,
) -> Result<(), StoreError> {
    let spool = |sub: &str, id: &str| inner.dir.join(sub).join(id);
    match write {
        Write::Insert(record, body) => {
            let charge = record.charge();
            if stored.saturating_add(charge) > inner.max_bytes {
                return Err(StoreError::Full {
                    limit: inner.max_bytes,
                });
            }
            if record.body_spooled {
                let path = spool("bodies", &record.id);
                write_synced(&path, body).map_err(io_error)?;
                files.written.push(path);
            } else {
                t.bodies
                    .insert(record.id.as_str(), body.as_ref())
                    .map_err(io_error)?;
            }
            if let Some(key) = &record.key {
                t.keys
                    .insert(key.as_str(), record.id.as_str())
                    .map_err(io_error)?;
            }
            t.put(record)?;
            *stored = stored.saturating_add(charge);
        }
        Write::Put(record) => {
            // A change to a job that was purged meanwhile is dropped: it
            // must not bring the job back.
            let Some(before) = t.record(&record.id)? else {
                return Ok(());
            };
            let before = before.charge();
            t.put(record)?;
            *stored = stored
                .saturating_sub(before)
                .saturating_add(record.charge());
        }
        Write::Finish(record, result) => {
            let before = t.record(&record.id)?;
            let after = stored
                .saturating_sub(before.as_ref().map_or(0, Record::charge))
                .saturating_add(record.charge());
            if result.is_some() && after > inner.max_bytes {
                return Err(StoreError::Full {
                    limit: inner.max_bytes,
                });
            }
            if let Some(body) = result {
                if record.outcome.as_ref().is_some_and(|o| o.spooled) {
                    let path = spool("results", &record.id);
                    write_synced(&path, body).map_err(io_error)?;
                    files.written.push(path);
                } else {
                    t.results
                        .insert(record.id.as_str(), body.as_ref())
                        .map_err(io_error)?;
                }
            }
            t.bodies.remove(record.id.as_str()).map_err(io_error)?;
            if record.body_spooled {
                files.remove.push(spool("bodies", &record.id));
            }
            t.put(record)?;
            let before = before.map_or(0, |r| r.charge());
            *stored = stored
                .saturating_sub(before)
                .saturating_add(record.charge());
        }
        Write::Purge(id) => {
            let Some(record) = t.record(id)? else {
                return Ok(());
            };
            t.jobs.remove(id.as_str()).map_err(io_error)?;
            t.bodies.remove(id.as_str()).map_err(io_error)?;
            t.results.remove(id.as_str()).map_err(io_error)?;
            if let Some(key) = &record.key {
                t.keys.remove(key.as_str()).map_err(io_error)?;
            }
            files.remove.push(spool("bodies", id));
            files.remove.push(spool("results", id));
            *stored = stored.saturating_sub(record.charge());
        }
    }
    Ok(())
}

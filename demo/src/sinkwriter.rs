//! A sink's file writer: the thread that owns a sink file, so that the engine worker running
//! the sink never waits on the file system.
//!
//! A buffered `write(2)` to ext4 can block for tens of milliseconds when it has to join a
//! journal transaction that an `fsync` (another sink's checkpoint) is committing; a sink's
//! worker was seen stalled for 90 ms in `ext4_da_write_begin` at 1 M records/s with
//! checkpoints every 200 ms. On the worker thread such a stall holds up every task of that
//! thread, and at 1 M records/s the backlog takes many times the stall to drain.
//!
//! So the [`Sink`](crate::operators::Sink) only formats rows, into buffers of about
//! [`BUFFER_BYTES`], and hands each full buffer to its writer thread, which:
//! - creates the file's directory if missing (fsyncing each parent of a directory it
//!   created) and claims the file ([`FencedFile::claim`]: job and epoch fencing, truncation
//!   to the length the restored checkpoint committed);
//! - for stream 0, retires the files of streams the job does not have ([`fence::retire`]), left
//!   by an earlier job with more streams in the same directory;
//! - appends the buffers in order;
//! - at a checkpoint ([`After::Checkpoint`]) fsyncs what it wrote and only then reports the
//!   sink's snapshot;
//! - at the end ([`After::Finish`]) fsyncs, writes the stage breakdown and marks itself
//!   finished;
//! - drops the file's pages from the page cache once they are on disk: the window before
//!   the latest write-back window ([`WRITEBACK_BYTES`]), and everything at a checkpoint's
//!   fsync and at the end.
//!
//! Sink files are written once and read later. Kept cached, their pages pile up, and every
//! page the kernel hands the next appends is one nobody has touched for a while, which on a
//! VM that returns free memory to its host costs a host fault on first touch: writing
//! 512 MiB took ~1.2 s of system time with fresh pages on the benchmark machine and 0.12 s
//! when the writer recycled its own. The kernel keeps dirty pages and pages still being
//! written back, so dropping never loses data.
//!
//! The queue is bounded ([`QUEUE_BUFFERS`] buffers). When it is full the sink stops taking
//! input, so backpressure reaches the producers, and the writer wakes the sink as soon as
//! it takes the next buffer. Emptied buffers go back to the sink for reuse. A failure (the
//! claim, a write, an fsync) ends the thread; it is kept for the sink to fail on, and the
//! sink is woken to notice it.
//!
//! An idle writer parks its thread outright: the sink unparks it after queueing a job. A
//! blocking channel receive would first spin and then `sched_yield` a few times before it
//! sleeps, and on a machine whose cores are held by spinning engine workers every one of
//! those yields hands the core to the worker and takes it back again, a preemption of the
//! worker each time. Parked, a writer costs the worker one wake-up per buffer.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use microcosm_engine::{EngineError, Notify};

use crate::checkpoint::{Snapshots, TaskState};
use crate::fence::{self, FencedFile, Owner};
use crate::operators::stages_path;

/// A sink hands its buffer over once it holds at least this many bytes (or at a checkpoint
/// or the end).
pub const BUFFER_BYTES: usize = 64 * 1024;

/// Buffers queued for the writer before the sink stops taking input: 2 MiB, about 100 ms of
/// one sink's output at 1 M records/s over four sinks, enough to ride out a slow journal
/// commit without backpressure.
pub const QUEUE_BUFFERS: usize = 32;

/// The writer starts the disk write-back of every this many appended bytes at once rather
/// than leaving it all to the checkpoint's fsync: the kernel's write-back work is spread over
/// the interval instead of landing on the CPUs in one burst at each barrier.
///
/// At 100k records/s (~1.9 MB/s per sink) a window of 1 MiB left each checkpoint's four
/// `fdatasync`s up to 1 MiB apiece to write back: 1.8–2.2 ms of the writers' CPU in the 6.5 ms
/// around each boundary, runs of up to 0.5 ms, each taken from an engine thread's vCPU.
/// With 256 KiB it is 0.86–0.99 ms, runs of at most 0.17 ms, for ~1 ms/s more in total;
/// 128 KiB cut no further and cost more.
pub const WRITEBACK_BYTES: u64 = 256 * 1024;

/// Room for the last row that crosses [`BUFFER_BYTES`], so a buffer never reallocates.
const BUFFER_SLACK: usize = 512;

/// What the writer does after appending a job's bytes.
#[derive(Debug)]
pub enum After {
    /// Nothing more.
    Nothing,
    /// Make everything written so far durable, then report `state` for `checkpoint`.
    Checkpoint {
        /// The checkpoint id.
        checkpoint: u64,
        /// The sink's state at the barrier (file length and row count).
        state: TaskState,
    },
    /// The sink's input ended: fsync, write `stages` (the per-stage breakdown) to
    /// `stages_path`, and finish.
    Finish {
        /// Where the stage breakdown goes.
        stages_path: PathBuf,
        /// Its text.
        stages: String,
    },
}

/// Bytes to append, then an action.
#[derive(Debug)]
pub struct Job {
    /// Rows to append (may be empty).
    pub data: Vec<u8>,
    /// What to do once they are written.
    pub after: After,
}

/// The answer to [`SinkWriter::offer`].
#[derive(Debug)]
pub enum Offer {
    /// The writer queued the job.
    Taken,
    /// The queue is full: the job comes back, and the sink is notified when room frees.
    Full(Job),
}

struct Shared {
    failed: Mutex<Option<String>>,
    finished: AtomicBool,
    wants_wake: AtomicBool,
    sink: Arc<dyn Notify>,
}

impl Shared {
    fn fail(&self, reason: String) {
        *self.failed.lock().unwrap_or_else(PoisonError::into_inner) = Some(reason);
        self.sink.notify();
    }
}

/// The sink's end of its writer thread; dropping it lets the thread finish the queued jobs
/// and exit.
pub struct SinkWriter {
    jobs: Sender<Job>,
    free: Receiver<Vec<u8>>,
    shared: Arc<Shared>,
    /// Declared after `jobs`: fields drop in order, so the writer is woken after the sink
    /// hung up and sees the disconnect once it has taken the last job.
    writer: WriterThread,
}

/// The writer thread, unparked after every queued job and once more when dropped.
struct WriterThread(std::thread::Thread);

impl WriterThread {
    /// Wakes the writer if it is parked (one atomic operation if it is not).
    fn wake(&self) {
        self.0.unpark();
    }
}

impl Drop for WriterThread {
    fn drop(&mut self) {
        self.wake();
    }
}

/// Where and as whom a writer writes.
#[derive(Debug, Clone)]
pub struct WriterTarget {
    /// The sink's stream index (names the thread and the errors).
    pub stream: u32,
    /// The data file.
    pub path: PathBuf,
    /// The job and attempt that write (see [`crate::fence`]).
    pub owner: Owner,
    /// Bytes of the file to keep when claiming it (the committed length).
    pub keep: u64,
    /// The job's number of streams. The writer of stream 0 retires every `sink_<n>.csv` in
    /// the file's directory with `n` at least this (see [`fence::retire`]).
    pub streams: u32,
}

impl SinkWriter {
    /// Starts the writer thread for `target` with a queue of `queue` buffers; `sink` is
    /// notified when a full queue frees room, when the writer finished, and when it failed.
    pub fn start(
        target: WriterTarget,
        snapshots: Snapshots,
        sink: Arc<dyn Notify>,
        queue: usize,
    ) -> Result<SinkWriter, EngineError> {
        let (jobs, queued) = crossbeam_channel::bounded::<Job>(queue.max(1));
        let (recycle, free) = crossbeam_channel::bounded::<Vec<u8>>(queue.max(1) + 1);
        let shared = Arc::new(Shared {
            failed: Mutex::new(None),
            finished: AtomicBool::new(false),
            wants_wake: AtomicBool::new(false),
            sink,
        });
        let thread_shared = shared.clone();
        let stream = target.stream;
        let handle = std::thread::Builder::new()
            .name(format!("sink-{stream}-file"))
            .spawn(move || {
                if let Err(reason) =
                    write_loop(&target, &queued, &recycle, &snapshots, &thread_shared)
                {
                    thread_shared.fail(reason);
                }
            })
            .map_err(|e| {
                EngineError::operator(format!("sink {stream}: cannot start its file writer: {e}"))
            })?;
        Ok(SinkWriter {
            jobs,
            free,
            shared,
            writer: WriterThread(handle.thread().clone()),
        })
    }

    /// An empty buffer with room for [`BUFFER_BYTES`] and one more row: a recycled one if
    /// the writer returned any.
    pub fn buffer(&self) -> Vec<u8> {
        match self.free.try_recv() {
            Ok(buf) => buf,
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => {
                Vec::with_capacity(BUFFER_BYTES + BUFFER_SLACK)
            }
        }
    }

    /// Queues `job` without blocking. Fails if the writer is gone (after a failure, which
    /// the error names).
    pub fn offer(&self, job: Job) -> Result<Offer, EngineError> {
        // Announce interest first: if the writer takes a job after the attempt below found
        // the queue full, it sees the flag and notifies.
        self.shared.wants_wake.store(true, Ordering::SeqCst);
        match self.jobs.try_send(job) {
            Ok(()) => {
                self.shared.wants_wake.store(false, Ordering::SeqCst);
                self.writer.wake();
                Ok(Offer::Taken)
            }
            Err(TrySendError::Full(job)) => Ok(Offer::Full(job)),
            Err(TrySendError::Disconnected(_)) => {
                Err(EngineError::operator(self.failure().unwrap_or_else(|| {
                    "the sink's file writer stopped".to_owned()
                })))
            }
        }
    }

    /// Why the writer failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.shared
            .failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether the writer completed an [`After::Finish`] job.
    pub fn is_finished(&self) -> bool {
        self.shared.finished.load(Ordering::Acquire)
    }
}

impl std::fmt::Debug for SinkWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkWriter")
            .field("queued", &self.jobs.len())
            .field("finished", &self.is_finished())
            .finish_non_exhaustive()
    }
}

fn describe(target: &WriterTarget, what: &str, path: &Path, error: &io::Error) -> String {
    format!("sink {}: {what} {}: {error}", target.stream, path.display())
}

/// Creates `dir` and its missing parents like [`fs::create_dir_all`], and fsyncs the parent of
/// every directory it creates, so the new entries survive a power loss.
fn create_dir_all_durable(dir: &Path) -> io::Result<()> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(parent) = parent {
        create_dir_all_durable(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => fence::sync_dir(parent.unwrap_or(Path::new("."))),
        // Created by someone else meanwhile (another sink of the job): they fsync it.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Retires (see [`fence::retire`]) every `sink_<n>.csv` in `dir` with `n >= streams`, and its
/// stage breakdown: files an earlier job with more streams left there, which the verifier
/// would flag. Returns the names retired.
fn retire_stale(dir: &Path, streams: u32, owner: Owner) -> io::Result<Vec<String>> {
    let mut retired = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        // The names the verifier takes for sink files.
        let stale = name
            .strip_prefix("sink_")
            .and_then(|rest| rest.strip_suffix(".csv"))
            .and_then(|index| index.parse::<u64>().ok())
            .is_some_and(|index| index >= u64::from(streams));
        if !stale {
            continue;
        }
        let path = entry.path();
        if fence::retire(&path, owner)? {
            retired.push(name.to_owned());
        }
        match fs::remove_file(stages_path(&path)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    retired.sort();
    Ok(retired)
}

/// The writer thread: claims the file, then serves jobs until the sink hangs up or a job
/// finishes it. An error ends it with the reason.
fn write_loop(
    target: &WriterTarget,
    queued: &Receiver<Job>,
    recycle: &Sender<Vec<u8>>,
    snapshots: &Snapshots,
    shared: &Shared,
) -> Result<(), String> {
    let path = &target.path;
    let dir = path.parent().unwrap_or(Path::new(""));
    create_dir_all_durable(dir)
        .map_err(|e| describe(target, "creating the directory of", path, &e))?;
    let mut file = FencedFile::claim(path, target.owner, target.keep)
        .map_err(|e| describe(target, "claiming", path, &e))?;
    if target.stream == 0 {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let retired = retire_stale(dir, target.streams, target.owner).map_err(|e| {
            describe(
                target,
                "retiring other jobs' files of streams beyond its own in",
                dir,
                &e,
            )
        })?;
        if !retired.is_empty() {
            tracing::info!(
                dir = %dir.display(),
                files = ?retired,
                owner = %target.owner,
                "removed sink files of streams this job does not have"
            );
        }
    }
    // File offsets: the end of what was written, and where write-back was last started.
    let mut end = target.keep;
    let mut written_back = target.keep;
    // The start of the write-back window before the latest; the end of what was dropped from
    // the page cache; the end of what was dropped after an fsync. A window dropped while some
    // of its pages were still being written back keeps them cached, so the drop after an
    // fsync starts again from the last fsync's.
    let mut previous_window = target.keep;
    let mut dropped = target.keep;
    let mut dropped_durable = target.keep;
    let drop_cached = |file: &FencedFile, from: u64, to: u64| {
        if to > from
            && let Err(e) = file.drop_cached(from, to - from)
        {
            tracing::debug!(stream = target.stream, error = %e, "dropping cached pages failed");
        }
    };
    loop {
        let job = match queued.try_recv() {
            Ok(job) => job,
            Err(TryRecvError::Empty) => {
                // The sink unparks after every job it queues and when it hangs up; a job
                // queued between the check above and this park leaves the unpark token set,
                // so the park returns at once. Waking for nothing just checks again.
                std::thread::park();
                continue;
            }
            Err(TryRecvError::Disconnected) => return Ok(()),
        };
        if shared.wants_wake.swap(false, Ordering::SeqCst) {
            shared.sink.notify();
        }
        let Job { mut data, after } = job;
        if !data.is_empty() {
            file.write_all(&data)
                .map_err(|e| describe(target, "writing", path, &e))?;
            end += data.len() as u64;
            if end - written_back >= WRITEBACK_BYTES {
                // Only a hint: the checkpoint's fsync is what makes the bytes durable.
                if let Err(e) = file.start_writeback(written_back, end - written_back) {
                    tracing::debug!(stream = target.stream, error = %e, "starting write-back failed");
                }
                // The window before this one has had a window's worth of appends to reach
                // the disk.
                drop_cached(&file, dropped, previous_window);
                dropped = dropped.max(previous_window);
                previous_window = written_back;
                written_back = end;
            }
        }
        data.clear();
        // A full recycle queue only means the sink holds enough buffers already.
        let _ = recycle.try_send(data);
        match after {
            After::Nothing => {}
            After::Checkpoint { checkpoint, state } => {
                file.sync_data()
                    .map_err(|e| describe(target, "fsyncing", path, &e))?;
                snapshots.report(checkpoint, false, &state);
                drop_cached(&file, dropped_durable, end);
                (dropped, dropped_durable) = (end, end);
            }
            After::Finish {
                stages_path,
                stages,
            } => {
                file.sync()
                    .map_err(|e| describe(target, "fsyncing", path, &e))?;
                drop_cached(&file, dropped_durable, end);
                fs::write(&stages_path, stages).map_err(|e| {
                    describe(target, "writing the stage breakdown", &stages_path, &e)
                })?;
                shared.finished.store(true, Ordering::Release);
                shared.sink.notify();
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::AtomicUsize;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::checkpoint::Snapshots;
    use crate::fence::fence_path;

    #[derive(Default)]
    struct Count(AtomicUsize);
    impl Notify for Count {
        fn notify(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn target(dir: &Path, epoch: u64) -> WriterTarget {
        WriterTarget {
            stream: 3,
            path: dir.join("out/sink_3.csv"),
            owner: Owner { job: 1, epoch },
            keep: 0,
            streams: 4,
        }
    }

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn data(text: &str) -> Job {
        Job {
            data: text.as_bytes().to_vec(),
            after: After::Nothing,
        }
    }

    #[test]
    fn appends_in_order_reports_after_the_fsync_and_finishes() {
        let dir = tempfile::tempdir().unwrap();
        let (snapshots, taken) = Snapshots::in_memory(7);
        let woken = Arc::new(Count::default());
        let t = target(dir.path(), 1);
        let writer = SinkWriter::start(t.clone(), snapshots, woken.clone(), 4).unwrap();
        for job in [
            data("a\n"),
            Job {
                data: b"b\n".to_vec(),
                after: After::Checkpoint {
                    checkpoint: 5,
                    state: TaskState::Sink { length: 4, rows: 2 },
                },
            },
            data("c\n"),
            Job {
                data: Vec::new(),
                after: After::Finish {
                    stages_path: dir.path().join("out/sink_3.csv.stages"),
                    stages: "stage count\n".to_owned(),
                },
            },
        ] {
            // The queue holds 4: nothing is refused.
            assert!(matches!(writer.offer(job).unwrap(), Offer::Taken));
        }
        wait_for("the writer to finish", || writer.is_finished());
        assert_eq!(fs::read_to_string(&t.path).unwrap(), "a\nb\nc\n");
        let reported = taken.taken();
        assert_eq!(reported.len(), 1);
        assert_eq!((reported[0].task, reported[0].checkpoint), (7, 5));
        assert!(matches!(
            TaskState::decode(7, &reported[0].state).unwrap(),
            TaskState::Sink { length: 4, rows: 2 }
        ));
        assert_eq!(
            fs::read_to_string(dir.path().join("out/sink_3.csv.stages")).unwrap(),
            "stage count\n"
        );
        assert!(
            woken.0.load(Ordering::SeqCst) >= 1,
            "finishing notifies the sink"
        );
        assert!(writer.failure().is_none());
        // Emptied buffers come back for reuse.
        assert!(writer.buffer().is_empty());
    }

    #[test]
    fn written_pages_leave_the_page_cache_by_the_checkpoint() {
        let dir = crate::fence::tests::disk_tempdir();
        let (snapshots, taken) = Snapshots::in_memory(7);
        let t = target(dir.path(), 1);
        let writer =
            SinkWriter::start(t.clone(), snapshots, Arc::new(Count::default()), 8).unwrap();
        let window = usize::try_from(WRITEBACK_BYTES).unwrap();
        let mut expected = Vec::new();
        for i in 0..4u8 {
            let job = Job {
                data: vec![b'a' + i; window],
                after: if i == 3 {
                    After::Checkpoint {
                        checkpoint: 1,
                        state: TaskState::Sink {
                            length: 4 * WRITEBACK_BYTES,
                            rows: 4,
                        },
                    }
                } else {
                    After::Nothing
                },
            };
            expected.extend_from_slice(&job.data);
            assert!(matches!(writer.offer(job).unwrap(), Offer::Taken));
        }
        wait_for("the checkpoint", || !taken.taken().is_empty());
        // The writer drops the pages right after reporting.
        wait_for("the file's pages to leave the page cache", || {
            crate::fence::tests::resident_pages(&t.path) <= 8
        });
        assert_eq!(fs::read(&t.path).unwrap(), expected);
    }

    #[test]
    fn an_idle_writer_wakes_for_each_later_job_and_exits_once_the_sink_hangs_up() {
        let dir = tempfile::tempdir().unwrap();
        let t = target(dir.path(), 1);
        let writer = SinkWriter::start(
            t.clone(),
            Snapshots::in_memory(0).0,
            Arc::new(Count::default()),
            4,
        )
        .unwrap();
        let mut expected = String::new();
        for i in 0..5 {
            // Long enough for the writer to have drained the queue and parked.
            std::thread::sleep(Duration::from_millis(20));
            let row = format!("{i}\n");
            assert!(matches!(writer.offer(data(&row)).unwrap(), Offer::Taken));
            expected.push_str(&row);
            wait_for(&format!("row {i}"), || {
                fs::read_to_string(&t.path).is_ok_and(|s| s == expected)
            });
        }
        // `shared` is held here, by the sink's end and by the writer thread until it returns.
        let shared = writer.shared.clone();
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            Arc::strong_count(&shared) == 3,
            "the writer waits while the sink holds it"
        );
        drop(writer);
        wait_for("the writer to exit", || Arc::strong_count(&shared) == 1);
    }

    #[test]
    fn a_full_queue_refuses_and_the_writer_wakes_the_sink_when_room_frees() {
        let dir = tempfile::tempdir().unwrap();
        let t = target(dir.path(), 1);
        fs::create_dir_all(t.path.parent().unwrap()).unwrap();
        // Hold the fence lock so the writer blocks in its claim and takes nothing.
        let fence = fs::File::create(fence_path(&t.path)).unwrap();
        // SAFETY: flock on a descriptor owned by `fence`, open for the whole test.
        assert_eq!(unsafe { libc::flock(fence.as_raw_fd(), libc::LOCK_EX) }, 0);
        let woken = Arc::new(Count::default());
        let writer =
            SinkWriter::start(t.clone(), Snapshots::in_memory(0).0, woken.clone(), 1).unwrap();
        assert!(matches!(writer.offer(data("1\n")).unwrap(), Offer::Taken));
        let refused = match writer.offer(data("2\n")).unwrap() {
            Offer::Full(job) => job,
            Offer::Taken => panic!("a queue of one took two jobs while the writer was blocked"),
        };
        assert_eq!(refused.data, b"2\n");
        assert_eq!(woken.0.load(Ordering::SeqCst), 0);
        // SAFETY: as above.
        assert_eq!(unsafe { libc::flock(fence.as_raw_fd(), libc::LOCK_UN) }, 0);
        wait_for("the wake-up after room freed", || {
            woken.0.load(Ordering::SeqCst) == 1
        });
        assert!(matches!(writer.offer(refused).unwrap(), Offer::Taken));
        drop(writer);
        wait_for("both rows", || {
            fs::read_to_string(&t.path).is_ok_and(|s| s == "1\n2\n")
        });
    }

    #[test]
    fn a_lost_claim_fails_the_writer_and_wakes_the_sink() {
        let dir = tempfile::tempdir().unwrap();
        let t = target(dir.path(), 1);
        fs::create_dir_all(t.path.parent().unwrap()).unwrap();
        FencedFile::claim(&t.path, Owner { job: 1, epoch: 2 }, 0).unwrap();
        let woken = Arc::new(Count::default());
        let writer = SinkWriter::start(t, Snapshots::in_memory(0).0, woken.clone(), 2).unwrap();
        wait_for("the failure", || writer.failure().is_some());
        let reason = writer.failure().unwrap();
        assert!(
            reason.contains("sink 3: claiming") && reason.contains("superseded"),
            "{reason}"
        );
        assert!(woken.0.load(Ordering::SeqCst) >= 1);
        wait_for("the thread to end", || match writer.offer(data("x\n")) {
            Err(e) => e.to_string().contains("superseded"),
            Ok(_) => false,
        });
    }

    #[test]
    fn a_claim_refused_to_an_older_job_fails_the_writer_naming_both_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let t = target(dir.path(), 1);
        fs::create_dir_all(t.path.parent().unwrap()).unwrap();
        FencedFile::claim(&t.path, Owner { job: 2, epoch: 1 }, 0).unwrap();
        let writer =
            SinkWriter::start(t, Snapshots::in_memory(0).0, Arc::new(Count::default()), 2).unwrap();
        wait_for("the failure", || writer.failure().is_some());
        let reason = writer.failure().unwrap();
        assert!(
            reason.contains("sink 3: claiming")
                && reason.contains("belong to job 2, newer than job 1"),
            "{reason}"
        );
    }

    #[test]
    fn stream_0_retires_the_files_of_streams_the_job_does_not_have() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let earlier = Owner { job: 1, epoch: 2 };
        // An earlier job with six streams; its writer of stream 5 is still running.
        let mut running = None;
        for stream in 0..6 {
            let path = out.join(format!("sink_{stream}.csv"));
            fs::create_dir_all(&out).unwrap();
            let mut file = FencedFile::claim(&path, earlier, 0).unwrap();
            file.write_all(b"earlier job\n").unwrap();
            fs::write(stages_path(&path), "stages\n").unwrap();
            running = Some(file);
        }
        fs::write(out.join("notes.txt"), "kept").unwrap();
        let streams = 2;
        let owner = Owner { job: 2, epoch: 1 };
        let mut writers = Vec::new();
        // Stream 1 first: only stream 0 retires anything.
        for stream in [1, 0] {
            let t = WriterTarget {
                stream,
                path: out.join(format!("sink_{stream}.csv")),
                owner,
                keep: 0,
                streams,
            };
            let (snapshots, taken) = Snapshots::in_memory(stream);
            let writer = SinkWriter::start(t, snapshots, Arc::new(Count::default()), 2).unwrap();
            let job = Job {
                data: b"this job\n".to_vec(),
                after: After::Checkpoint {
                    checkpoint: 1,
                    state: TaskState::Sink { length: 9, rows: 1 },
                },
            };
            assert!(matches!(writer.offer(job).unwrap(), Offer::Taken));
            wait_for("the checkpoint", || !taken.taken().is_empty());
            if stream == 1 {
                assert!(out.join("sink_5.csv").exists(), "stream 1 retires nothing");
            }
            writers.push(writer);
        }
        let mut names: Vec<String> = fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "notes.txt",
                "sink_0.csv",
                "sink_0.csv.fence",
                "sink_0.csv.stages",
                "sink_1.csv",
                "sink_1.csv.fence",
                "sink_1.csv.stages",
                "sink_2.csv.fence",
                "sink_3.csv.fence",
                "sink_4.csv.fence",
                "sink_5.csv.fence",
            ]
        );
        for stream in 0..2 {
            let path = out.join(format!("sink_{stream}.csv"));
            assert_eq!(fs::read_to_string(&path).unwrap(), "this job\n");
        }
        for stream in 2..6 {
            let path = out.join(format!("sink_{stream}.csv"));
            assert_eq!(fence::owner(&path).unwrap(), Some(owner));
        }
        // The earlier job's writer still running on a retired file is fenced out.
        let err = running.unwrap().write_all(b"late\n").unwrap_err();
        assert!(err.to_string().contains("taken over by job 2"), "{err}");
        for writer in &writers {
            assert!(writer.failure().is_none(), "{:?}", writer.failure());
        }
    }

    #[test]
    fn missing_directories_are_created_durably() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a/b/c");
        create_dir_all_durable(&deep).unwrap();
        assert!(deep.is_dir());
        // Existing directories are fine, a file in the way is not.
        create_dir_all_durable(&deep).unwrap();
        fs::write(dir.path().join("file"), "x").unwrap();
        assert!(create_dir_all_durable(&dir.path().join("file/d")).is_err());
    }
}

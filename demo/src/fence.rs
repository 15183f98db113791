//! Fencing of sink files: output of a replaced attempt, or of an older job, never lands.
//!
//! Every sink file `sink_<i>.csv` has a fence file `sink_<i>.csv.fence` naming the
//! [`Owner`] of the output: the job and the epoch of its attempt, as one line
//! `job <job> epoch <epoch>`. Epochs count the attempts of one job (every job's first attempt
//! is epoch 1), so the job is what tells two jobs writing to the same directory (the same
//! `sink-dir` and `flow-id`) apart.
//!
//! Each claim also records a token of its own (`claim <token>` after the epoch), so that of
//! two writers of the same attempt (which the scheduler never starts, but a bug or an operator
//! might) only the one that claimed last writes: the fence holds one writer, not one attempt.
//!
//! An attempt *claims* a file ([`FencedFile::claim`]) under an exclusive lock on its fence:
//! - the same job: a claim by an epoch older than the owner's is refused ("superseded");
//!   otherwise the claim records its epoch and truncates the data file to the length its
//!   checkpoint committed (0 for a fresh start), dropping what an older attempt wrote after it;
//! - a newer job (a higher job id: ids increase with every submission to a cluster) takes the
//!   file over: the claim records it and the file starts empty;
//! - an older job is refused, with an error naming both jobs and the directory.
//!
//! Every later write and every checkpoint fsync of any attempt takes the same lock, re-reads
//! the fence and fails if someone else owns the file now. So an old attempt that wakes up
//! after being replaced (a paused or partitioned executor), or a job whose files a newer job
//! took over, fails its sink instead of appending rows.
//!
//! A newer job with fewer streams than the one before would leave that job's files of the
//! streams it does not have next to its own, and the verifier flags every `sink_<n>.csv`
//! beyond the job's streams. So the sink of stream 0 *retires* them ([`retire`]) when it
//! claims its own file: the same ownership rules, then the data file is removed. The fence
//! file stays, naming the new owner, so a writer of the older job still running on it is
//! fenced out too (removing the fence would let it lock a file nobody else uses).
//!
//! A fence file holding only an epoch (written before fences recorded the job) reads as
//! job 0, older than every job: any job takes such files over. An empty fence (created, not
//! yet written) has no owner. Anything else that is not exactly the format is an error
//! naming the fence file, never a panic. Job ids are per cluster: a job of a fresh cluster
//! (id 1 again) is refused files a job of an earlier cluster with a higher id owns; remove
//! the directory, or give the job another `flow-id` or `sink-dir`.
//!
//! Creating a fence or data file, and retiring one, fsyncs the directory too (once per
//! claim, not per write), so a committed checkpoint never refers to a file whose directory
//! entry a power loss could drop.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::sinkfile::parse_u64;

/// The fence file of a data file.
pub fn fence_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".fence");
    PathBuf::from(p)
}

/// The attempt that owns a sink file: its job and the attempt's epoch within the job.
///
/// Ordered by job, then epoch: the greater owner wins a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Owner {
    /// The job id (ids increase with every job submitted to a cluster).
    pub job: u64,
    /// The attempt's epoch within the job (1 for its first attempt).
    pub epoch: u64,
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "job {} epoch {}", self.job, self.epoch)
    }
}

/// What a fence records: the owner and the token of the claim that recorded it (0 in fences
/// written before claims had tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fence {
    owner: Owner,
    claim: u64,
}

impl Fence {
    /// A fence for a new claim by `owner`, with a token no other claim draws.
    fn new_claim(owner: Owner) -> Self {
        use std::hash::BuildHasher;
        static CLAIMS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let n = CLAIMS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Randomly keyed per process; never 0, which stands for "no token".
        let claim = std::collections::hash_map::RandomState::new()
            .hash_one((std::process::id(), n, nanos))
            .max(1);
        Self { owner, claim }
    }

    /// The fence file's content: fixed width (every number zero-padded to 20 digits,
    /// [`MAX_FENCE_BYTES`] in all), so that a new record always overwrites the whole of the
    /// old one in a single small write and a crash never leaves a mix of the two.
    fn record(self) -> String {
        format!(
            "job {:020} epoch {:020} claim {:020}\n",
            self.owner.job, self.owner.epoch, self.claim
        )
    }
}

/// Holds an exclusive `flock` until dropped.
struct Locked<'a>(&'a File);

impl<'a> Locked<'a> {
    fn new(file: &'a File) -> io::Result<Self> {
        // SAFETY: flock on a valid, open file descriptor owned by `file`.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc == 0 {
            Ok(Self(file))
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        // SAFETY: unlocking the descriptor locked in `new`, still open (borrowed).
        unsafe {
            libc::flock(self.0.as_raw_fd(), libc::LOCK_UN);
        }
    }
}

/// The owner of data file `path` (`None` if nobody claimed it yet), read from its fence file
/// without taking the lock.
pub fn owner(path: &Path) -> io::Result<Option<Owner>> {
    let fence = fence_path(path);
    match File::open(&fence) {
        Ok(file) => Ok(read_fence(&file, &fence)?.map(|f| f.owner)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The longest fence a claim writes: `job <u64> epoch <u64> claim <u64>` and a newline.
const MAX_FENCE_BYTES: usize = "job ".len() + 20 + " epoch ".len() + 20 + " claim ".len() + 20 + 1;

/// Reads the fence in `fence` (at `path`, for errors) with one positioned read: this runs
/// before every append, so it avoids the seek, size query and second read that reading the
/// file to its end costs.
fn read_fence(fence: &File, path: &Path) -> io::Result<Option<Fence>> {
    // One byte more than a fence holds tells a too-long fence from a full-length one.
    let mut buf = [0u8; MAX_FENCE_BYTES + 1];
    // A regular file returns less than asked only at its end.
    let len = loop {
        match fence.read_at(&mut buf, 0) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    };
    let bad = |why: String| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad fence {}: {why}", path.display()),
        )
    };
    if len > MAX_FENCE_BYTES {
        return Err(bad(format!("longer than {MAX_FENCE_BYTES} bytes")));
    }
    let text = std::str::from_utf8(&buf[..len]).map_err(|e| bad(format!("not text: {e}")))?;
    parse_fence(text).map_err(bad)
}

/// Parses a fence's text: empty (no owner), `job <job> epoch <epoch> claim <token>` or (the
/// format before claims had tokens: token 0) `job <job> epoch <epoch>`, with an optional
/// final newline, or a bare epoch (the format before fences recorded the job: job 0).
fn parse_fence(text: &str) -> Result<Option<Fence>, String> {
    if text.is_empty() {
        return Ok(None);
    }
    let line = text.strip_suffix('\n').unwrap_or(text);
    let number = |field: &str, what: &str| {
        // Records are zero-padded (older ones were not): the digits after the padding.
        let digits = field.trim_start_matches('0');
        let digits = if digits.is_empty() && !field.is_empty() {
            "0"
        } else {
            digits
        };
        parse_u64(digits).map_err(|problem| format!("{what} {field:?} in {text:?}: {problem}"))
    };
    let fields: Vec<&str> = line.split(' ').collect();
    let fence = |job: u64, epoch: u64, claim: u64| {
        Some(Fence {
            owner: Owner { job, epoch },
            claim,
        })
    };
    match fields.as_slice() {
        ["job", job, "epoch", epoch, "claim", claim] => Ok(fence(
            number(job, "job")?,
            number(epoch, "epoch")?,
            number(claim, "claim")?,
        )),
        ["job", job, "epoch", epoch] => Ok(fence(number(job, "job")?, number(epoch, "epoch")?, 0)),
        [epoch] if !epoch.is_empty() && epoch.bytes().all(|b| b.is_ascii_digit()) => {
            Ok(fence(0, number(epoch, "epoch")?, 0))
        }
        _ => Err(format!(
            "{text:?} is not `job <job> epoch <epoch> claim <token>` (a cut-off or damaged fence)"
        )),
    }
}

/// The directory holding `path` (`.` for a bare file name).
fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Makes the entries of `dir` durable: files created in or removed from it since survive a
/// power loss.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Opens `path` for writing (and reading if `read`), creating it if missing; says whether
/// it created it.
fn open_or_create(path: &Path, read: bool) -> io::Result<(File, bool)> {
    let mut options = OpenOptions::new();
    options.read(read).write(true);
    match options.clone().create_new(true).open(path) {
        Ok(file) => Ok((file, true)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok((options.open(path)?, false)),
        Err(e) => Err(e),
    }
}

/// Why `ours` may not claim a file `current` owns (to keep its first `keep` bytes), if it
/// may not. `dir` is the file's directory, for the message.
fn refusal(current: Option<Owner>, ours: Owner, keep: u64, dir: &Path) -> Option<io::Error> {
    let current = current?;
    if current.job > ours.job {
        return Some(io::Error::other(format!(
            "the sink files in {} belong to job {}, newer than job {}; refusing to write \
             (the newest job writing to a directory takes its files over: remove the directory \
             or give job {} another flow-id or sink-dir)",
            dir.display(),
            current.job,
            ours.job,
            ours.job
        )));
    }
    if current.job == ours.job && current.epoch > ours.epoch {
        return Some(superseded(ours, current));
    }
    if current.job < ours.job && keep > 0 {
        return Some(io::Error::other(format!(
            "job {} cannot resume its output in {} from a checkpoint: job {} owns the files now",
            ours.job,
            dir.display(),
            current.job
        )));
    }
    None
}

/// Writes `record` into the locked `fence` and makes it durable. Records have a fixed length
/// and no fence is longer, so the write replaces the old record whole and the length is already
/// right (the cut only matters for a fence of the older, shorter format, which the write then
/// covers entirely).
fn record_fence(fence: &File, record: Fence) -> io::Result<()> {
    let record = record.record();
    fence.write_all_at(record.as_bytes(), 0)?;
    fence.set_len(record.len() as u64)?;
    fence.sync_all()
}

/// Retires data file `path` for `owner`: under the fence lock, by the rules of
/// [`FencedFile::claim`] (with nothing to keep), records `owner` in the fence and removes the
/// data file; the fence stays, so a writer still running on the file is fenced out. Returns
/// whether a data file was removed. Used for the files of streams a newer job does not have.
pub fn retire(path: &Path, owner: Owner) -> io::Result<bool> {
    let fence_file = fence_path(path);
    let dir = dir_of(path);
    let (fence, created) = open_or_create(&fence_file, true)?;
    let _lock = Locked::new(&fence)?;
    let current = read_fence(&fence, &fence_file)?.map(|f| f.owner);
    if let Some(refused) = refusal(current, owner, 0, dir) {
        return Err(refused);
    }
    record_fence(&fence, Fence::new_claim(owner))?;
    let removed = match std::fs::remove_file(path) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(e),
    };
    if created || removed {
        sync_dir(dir)?;
    }
    Ok(removed)
}

/// A data file owned by one attempt; writes and syncs fail once another attempt or job claims
/// the file.
#[derive(Debug)]
pub struct FencedFile {
    data: File,
    fence: File,
    fence_path: PathBuf,
    /// What this file's claim recorded.
    claimed: Fence,
}

impl FencedFile {
    /// Claims `path` for `owner` by the rules of the [module docs](self): fails if a newer
    /// attempt of the same job or a newer job owns it; otherwise records `owner` and truncates
    /// the file to its first `keep` bytes (the length a checkpoint committed; 0 starts it
    /// empty). Fails if the file is shorter than `keep` (committed output is missing), or if
    /// `keep` is not 0 while another job owns the file. Fsyncs the directory if it created
    /// the data or the fence file.
    pub fn claim(path: &Path, owner: Owner, keep: u64) -> io::Result<Self> {
        let fence_path = fence_path(path);
        let dir = dir_of(path);
        let (fence, fence_created) = open_or_create(&fence_path, true)?;
        let claimed = Fence::new_claim(owner);
        let (data, data_created) = {
            let _lock = Locked::new(&fence)?;
            let current = read_fence(&fence, &fence_path)?.map(|f| f.owner);
            if let Some(refused) = refusal(current, owner, keep, dir) {
                return Err(refused);
            }
            if let Some(previous) = current.filter(|c| c.job != owner.job) {
                tracing::info!(
                    path = %path.display(),
                    previous = %previous,
                    owner = %owner,
                    "a newer job takes the sink file over"
                );
            }
            record_fence(&fence, claimed)?;
            let (mut data, created) = open_or_create(path, false)?;
            let len = data.metadata()?.len();
            if len < keep {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "holds {len} bytes, fewer than the {keep} its last checkpoint committed"
                    ),
                ));
            }
            data.set_len(keep)?;
            data.seek(SeekFrom::Start(keep))?;
            data.sync_all()?;
            (data, created)
        };
        if fence_created || data_created {
            sync_dir(dir)?;
        }
        Ok(Self {
            data,
            fence,
            fence_path,
            claimed,
        })
    }

    /// The owner this file was claimed for.
    pub fn owner(&self) -> Owner {
        self.claimed.owner
    }

    /// Fails unless the fence still holds this file's claim (takes the fence lock).
    fn check_owner(&self) -> io::Result<()> {
        let _lock = Locked::new(&self.fence)?;
        self.check_owner_locked()
    }

    /// [`FencedFile::check_owner`] with the lock already held.
    fn check_owner_locked(&self) -> io::Result<()> {
        let current = read_fence(&self.fence, &self.fence_path)?;
        match current {
            Some(current) if current == self.claimed => Ok(()),
            Some(current) if current.owner == self.claimed.owner => Err(io::Error::other(format!(
                "{}: its sink file in {} was claimed again by another writer of the same \
                 attempt; refusing to write",
                self.claimed.owner,
                dir_of(&self.fence_path).display()
            ))),
            current => Err(lost(
                self.claimed.owner,
                current.map(|f| f.owner),
                dir_of(&self.fence_path),
            )),
        }
    }

    /// Flushes written data and the file's metadata to disk; fails if another attempt or job
    /// has claimed the file since (nothing of this owner may then be reported durable).
    pub fn sync(&self) -> io::Result<()> {
        self.data.sync_all()?;
        self.check_owner()
    }

    /// Starts writing `len` bytes from `offset` back to disk without waiting for it
    /// (`sync_file_range(SYNC_FILE_RANGE_WRITE)` on Linux, nothing elsewhere), so that a
    /// later [`FencedFile::sync_data`] has less left to do.
    pub fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        #[cfg(target_os = "linux")]
        if let Some((offset, len)) = file_range(offset, len) {
            // SAFETY: a plain syscall on a descriptor owned by `self.data`, open while borrowed.
            let rc = unsafe {
                libc::sync_file_range(
                    self.data.as_raw_fd(),
                    offset,
                    len,
                    libc::SYNC_FILE_RANGE_WRITE,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = (offset, len);
        Ok(())
    }

    /// Drops the file's cached pages in `len` bytes from `offset` that are already on disk
    /// (`posix_fadvise(POSIX_FADV_DONTNEED)` on Linux, nothing elsewhere). Dirty pages and
    /// pages still being written back stay cached; nothing written is lost either way.
    pub fn drop_cached(&self, offset: u64, len: u64) -> io::Result<()> {
        #[cfg(target_os = "linux")]
        if let Some((offset, len)) = file_range(offset, len) {
            // SAFETY: a plain syscall on a descriptor owned by `self.data`, open while borrowed.
            let rc = unsafe {
                libc::posix_fadvise(
                    self.data.as_raw_fd(),
                    offset,
                    len,
                    libc::POSIX_FADV_DONTNEED,
                )
            };
            // posix_fadvise returns the error number instead of setting errno.
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = (offset, len);
        Ok(())
    }

    /// Flushes written data to disk, and of the metadata only what reading it back needs
    /// (`fdatasync`); fails if another attempt or job has claimed the file since.
    pub fn sync_data(&self) -> io::Result<()> {
        self.data.sync_data()?;
        self.check_owner()
    }
}

/// A byte range as the `off_t` pair the range system calls take; `None` past `i64::MAX`,
/// where no file has bytes.
#[cfg(target_os = "linux")]
fn file_range(offset: u64, len: u64) -> Option<(i64, i64)> {
    Some((i64::try_from(offset).ok()?, i64::try_from(len).ok()?))
}

/// The error of a claim by `ours` of a file a later attempt `owner` of the same job owns.
fn superseded(ours: Owner, owner: Owner) -> io::Error {
    io::Error::other(format!(
        "job {}: attempt of epoch {} was superseded by epoch {}; refusing to write",
        ours.job, ours.epoch, owner.epoch
    ))
}

/// The error of a write or sync by `ours` once the fence names `current` instead.
fn lost(ours: Owner, current: Option<Owner>, dir: &Path) -> io::Error {
    match current {
        Some(current) if current.job == ours.job => superseded(ours, current),
        Some(current) if current.job > ours.job => io::Error::other(format!(
            "job {}'s sink files in {} were taken over by job {}, a newer job writing to the \
             same directory; refusing to write",
            ours.job,
            dir.display(),
            current.job
        )),
        Some(current) => io::Error::other(format!(
            "{ours} lost its sink files in {} to {current}; refusing to write",
            dir.display()
        )),
        None => io::Error::other(format!(
            "the fence of {ours}'s sink file in {} names no owner any more; refusing to write",
            dir.display()
        )),
    }
}

impl Write for FencedFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let _lock = Locked::new(&self.fence)?;
        self.check_owner_locked()?;
        self.data.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.data.flush()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn of(job: u64, epoch: u64) -> Owner {
        Owner { job, epoch }
    }

    #[test]
    fn same_job_newer_attempt_fences_the_older_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sink_0.csv");
        assert_eq!(owner(&path).unwrap(), None, "nobody claimed it yet");
        let mut old = FencedFile::claim(&path, of(4, 1), 0).unwrap();
        old.write_all(b"old row\n").unwrap();
        assert_eq!(owner(&path).unwrap(), Some(of(4, 1)));
        let record = std::fs::read_to_string(fence_path(&path)).unwrap();
        assert!(
            record.starts_with("job 00000000000000000004 epoch 00000000000000000001 claim ")
                && record.len() == MAX_FENCE_BYTES,
            "{record:?}"
        );
        let mut new = FencedFile::claim(&path, of(4, 2), 0).unwrap();
        assert_eq!(owner(&path).unwrap(), Some(of(4, 2)));
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"",
            "a claim starts the file empty"
        );
        let err = old.write_all(b"stale row\n").unwrap_err();
        assert!(err.to_string().contains("superseded by epoch 2"), "{err}");
        let err = old.sync_data().unwrap_err();
        assert!(err.to_string().contains("superseded by epoch 2"), "{err}");
        new.write_all(b"new row\n").unwrap();
        new.sync_data().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new row\n");
        let err = FencedFile::claim(&path, of(4, 1), 0).expect_err("an old attempt cannot claim");
        assert!(err.to_string().contains("superseded"), "{err}");
        // The same epoch may claim again (a task restarted within its attempt).
        FencedFile::claim(&path, of(4, 2), 0).unwrap();
    }

    #[test]
    fn a_newer_job_takes_the_files_over_from_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sink_0.csv");
        // The first job recovered once: its files are at epoch 2.
        let mut first = FencedFile::claim(&path, of(3, 2), 0).unwrap();
        first.write_all(b"first job\n").unwrap();
        first.sync().unwrap();
        // The next job's first attempt is epoch 1, lower than 2, yet it is the newer job.
        let mut second = FencedFile::claim(&path, of(5, 1), 0).unwrap();
        assert_eq!(owner(&path).unwrap(), Some(of(5, 1)));
        assert_eq!(std::fs::read(&path).unwrap(), b"", "taken over empty");
        second.write_all(b"second job\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second job\n");
        // A newer job cannot resume from a checkpoint of bytes another job wrote.
        let err = FencedFile::claim(&path, of(6, 2), 5).unwrap_err();
        assert!(
            err.to_string().contains("job 6 cannot resume") && err.to_string().contains("job 5"),
            "{err}"
        );
        assert_eq!(
            owner(&path).unwrap(),
            Some(of(5, 1)),
            "a refused claim changes nothing"
        );
    }

    #[test]
    fn an_older_job_is_refused_with_both_jobs_and_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sink_0.csv");
        let mut newer = FencedFile::claim(&path, of(7, 1), 0).unwrap();
        newer.write_all(b"job 7\n").unwrap();
        for older in [of(6, 1), of(6, 9)] {
            let err = FencedFile::claim(&path, older, 0).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.contains("belong to job 7, newer than job 6")
                    && msg.contains(&dir.path().display().to_string()),
                "{msg}"
            );
        }
        assert_eq!(owner(&path).unwrap(), Some(of(7, 1)));
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"job 7\n",
            "nothing truncated"
        );
        newer.write_all(b"more\n").unwrap();
    }

    #[test]
    fn a_running_writer_of_an_older_job_is_fenced_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sink_0.csv");
        let mut older = FencedFile::claim(&path, of(1, 1), 0).unwrap();
        older.write_all(b"older\n").unwrap();
        let mut newer = FencedFile::claim(&path, of(2, 1), 0).unwrap();
        for err in [
            older.write_all(b"stale\n").unwrap_err(),
            older.sync_data().unwrap_err(),
            older.sync().unwrap_err(),
        ] {
            let msg = err.to_string();
            assert!(
                msg.contains("job 1's sink files in")
                    && msg.contains("were taken over by job 2")
                    && msg.contains(&dir.path().display().to_string()),
                "{msg}"
            );
        }
        newer.write_all(b"newer\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"newer\n");
    }

    #[test]
    fn retiring_a_file_removes_it_and_fences_its_writer_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sink_5.csv");
        let mut older = FencedFile::claim(&path, of(1, 1), 0).unwrap();
        older.write_all(b"row\n").unwrap();
        assert!(retire(&path, of(2, 1)).unwrap());
        assert!(!path.exists(), "the data file is gone");
        assert_eq!(owner(&path).unwrap(), Some(of(2, 1)), "the fence stays");
        let err = older.write_all(b"stale\n").unwrap_err();
        assert!(err.to_string().contains("taken over by job 2"), "{err}");
        // Again: nothing left to remove. The same job's later attempt may retire too.
        assert!(!retire(&path, of(2, 3)).unwrap());
        // An older job may not retire a newer job's file.
        FencedFile::claim(&path, of(4, 1), 0).unwrap();
        let err = retire(&path, of(3, 1)).unwrap_err();
        assert!(err.to_string().contains("newer than job 3"), "{err}");
        assert!(path.exists());
    }

    #[test]
    fn a_claim_keeps_the_committed_prefix_and_appends_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sink_0.csv");
        let mut first = FencedFile::claim(&path, of(1, 1), 0).unwrap();
        first
            .write_all(b"committed\nlost after the checkpoint\n")
            .unwrap();
        let mut second = FencedFile::claim(&path, of(1, 2), 10).unwrap();
        second.write_all(b"replayed\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"committed\nreplayed\n");
        let err = FencedFile::claim(&path, of(1, 3), 1000).unwrap_err();
        assert!(err.to_string().contains("fewer than the 1000"), "{err}");
    }

    /// Two writers of one attempt (never started by the scheduler): the later claim wins,
    /// the earlier writer's writes and syncs fail instead of interleaving rows.
    #[test]
    fn of_two_writers_of_one_attempt_only_the_later_claim_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sink_0.csv");
        let mut first = FencedFile::claim(&path, of(4, 2), 0).unwrap();
        first.write_all(b"first\n").unwrap();
        let mut second = FencedFile::claim(&path, of(4, 2), 6).unwrap();
        for err in [
            first.write_all(b"late\n").unwrap_err(),
            first.sync().unwrap_err(),
        ] {
            assert!(err.to_string().contains("claimed again"), "{err}");
        }
        second.write_all(b"second\n").unwrap();
        second.sync().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"first\nsecond\n");
        assert_eq!(owner(&path).unwrap(), Some(of(4, 2)));
    }

    #[test]
    fn a_damaged_fence_refuses_writes_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sink_0.csv");
        let max = of(u64::MAX, u64::MAX);
        let mut file = FencedFile::claim(&path, max, 0).unwrap();
        assert_eq!(
            owner(&path).unwrap(),
            Some(max),
            "20-digit numbers read back"
        );
        file.write_all(b"row\n").unwrap();
        let fence = fence_path(&path);
        for (content, expected) in [
            (
                &b"job 1 epoch 1 claim 123456789012345678901234567890123456789012345678901234567890"[..],
                "longer than 79 bytes",
            ),
            (b"job 12x epoch 1", "\"12x\""),
            (b"job 1 epoch 0x1", "\"0x1\""),
            (b"job 1 epoch 99999999999999999999", "too large"),
            (b"job 1 epoch", "not `job <job> epoch <epoch> claim <token>`"),
            (b"job 3", "not `job <job> epoch <epoch> claim <token>`"),
            (b"job 1  epoch 1", "not `job <job> epoch <epoch> claim <token>`"),
            (b"job 1 epoch 1\n\n", "not a decimal digit string"),
            (b"job 1 epoch 1 claim x", "\"x\""),
            (b"job 1 epoch 1 claim", "not `job <job> epoch <epoch> claim <token>`"),
            (b"\n", "not `job <job> epoch <epoch> claim <token>`"),
            (b"12x", "not `job <job> epoch <epoch> claim <token>`"),
            (&[0xff], "not text"),
        ] {
            std::fs::write(&fence, content).unwrap();
            for err in [
                file.write_all(b"row\n").unwrap_err(),
                owner(&path).unwrap_err(),
                FencedFile::claim(&path, of(9, 1), 0).unwrap_err(),
            ] {
                assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{content:?}: {err}");
                let msg = err.to_string();
                assert!(
                    msg.contains(&format!("bad fence {}", fence.display()))
                        && msg.contains(expected),
                    "{content:?}: {msg}"
                );
            }
        }
        std::fs::write(&fence, file.claimed.record()).unwrap();
        file.write_all(b"row\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"row\nrow\n");
    }

    #[test]
    fn a_bare_epoch_fence_is_job_zero_and_an_empty_one_has_no_owner() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sink_0.csv");
        std::fs::write(&path, b"left by an earlier build\n").unwrap();
        std::fs::write(fence_path(&path), b"3").unwrap();
        assert_eq!(owner(&path).unwrap(), Some(of(0, 3)));
        FencedFile::claim(&path, of(1, 1), 0).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"");
        std::fs::write(fence_path(&path), b"").unwrap();
        assert_eq!(owner(&path).unwrap(), None);
    }

    #[test]
    fn claiming_creates_both_files_and_the_claim_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sink_0.csv");
        FencedFile::claim(&path, of(1, 1), 0).unwrap();
        assert!(path.exists() && fence_path(&path).exists());
        // Every record has the same length, so a rewrite replaces the old one whole.
        FencedFile::claim(&path, of(12_345, 67_890), 0).unwrap();
        FencedFile::claim(&path, of(12_345, 67_891), 0).unwrap();
        FencedFile::claim(&path, of(99_999, 1), 0).unwrap();
        let record = std::fs::read_to_string(fence_path(&path)).unwrap();
        assert!(
            record.starts_with("job 00000000000000099999 epoch 00000000000000000001 claim ")
                && record.len() == MAX_FENCE_BYTES,
            "{record:?}"
        );
        for (o, claim) in [
            (of(0, 0), 1),
            (of(1, 1), 7),
            (of(u64::MAX, u64::MAX), u64::MAX),
        ] {
            let fence = Fence { owner: o, claim };
            assert_eq!(fence.record().len(), MAX_FENCE_BYTES, "{o}");
            assert_eq!(parse_fence(&fence.record()), Ok(Some(fence)));
        }
        // Records of the formats before claim tokens and before padding still read.
        std::fs::write(
            fence_path(&path),
            b"job 00000000000000000007 epoch 00000000000000000003\n",
        )
        .unwrap();
        assert_eq!(owner(&path).unwrap(), Some(of(7, 3)));
        std::fs::write(fence_path(&path), b"job 99999 epoch 2\n").unwrap();
        assert_eq!(owner(&path).unwrap(), Some(of(99_999, 2)));
        sync_dir(dir.path()).unwrap();
        let err = sync_dir(&dir.path().join("missing")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    /// A temporary directory whose files' pages can leave the page cache: the system's
    /// temporary directory unless it is a tmpfs (where file pages are the files' only copy),
    /// else one under the workspace's `target/`.
    pub(crate) fn disk_tempdir() -> tempfile::TempDir {
        let tmp = std::env::temp_dir();
        // SAFETY: `statfs` writes one `libc::statfs` into `st`, all-zero being a valid value;
        // the path is a NUL-terminated copy that outlives the call.
        let tmpfs = unsafe {
            let path = std::ffi::CString::new(tmp.as_os_str().as_encoded_bytes()).unwrap();
            let mut st: libc::statfs = std::mem::zeroed();
            libc::statfs(path.as_ptr(), &mut st) == 0 && st.f_type == libc::TMPFS_MAGIC
        };
        if !tmpfs {
            return tempfile::tempdir_in(tmp).unwrap();
        }
        let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
        std::fs::create_dir_all(&target).unwrap();
        tempfile::tempdir_in(target).unwrap()
    }

    /// How many of the file's pages are in the page cache (`mincore` over a mapping).
    pub(crate) fn resident_pages(path: &Path) -> usize {
        let file = File::open(path).unwrap();
        let len = usize::try_from(file.metadata().unwrap().len()).unwrap();
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap();
        let pages = len.div_ceil(page);
        if pages == 0 {
            return 0;
        }
        // SAFETY: a fresh read-only shared mapping of an open file, unmapped below; mincore
        // writes one byte per page of it into `vec`, which holds `pages` bytes.
        unsafe {
            let addr = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(addr, libc::MAP_FAILED);
            let mut vec = vec![0u8; pages];
            assert_eq!(libc::mincore(addr, len, vec.as_mut_ptr()), 0);
            libc::munmap(addr, len);
            vec.iter().filter(|&&b| b & 1 == 1).count()
        }
    }

    #[test]
    fn dropping_cached_pages_frees_clean_ones_and_keeps_the_content() {
        let dir = disk_tempdir();
        let path = dir.path().join("sink_0.csv");
        let mut file = FencedFile::claim(&path, of(1, 1), 0).unwrap();
        let content: Vec<u8> = (0..64 * 4096u32).map(|i| (i % 251) as u8).collect();
        file.write_all(&content).unwrap();
        let written = resident_pages(&path);
        assert!(written >= 60, "just-written pages are cached: {written}");
        // Dropping before the data is on disk loses nothing.
        file.drop_cached(0, content.len() as u64).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), content);
        file.sync_data().unwrap();
        file.drop_cached(0, content.len() as u64).unwrap();
        let left = resident_pages(&path);
        assert!(
            left <= 4,
            "clean pages are dropped: {left} of {written} left"
        );
        assert_eq!(std::fs::read(&path).unwrap(), content);
    }

    #[test]
    fn write_back_and_fdatasync_keep_the_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sink_0.csv");
        let mut file = FencedFile::claim(&path, of(1, 1), 0).unwrap();
        file.write_all(b"one\ntwo\n").unwrap();
        file.start_writeback(0, 8).unwrap();
        // A range past the end is accepted too (the kernel clips it).
        file.start_writeback(4, 1 << 20).unwrap();
        file.sync_data().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one\ntwo\n");
    }
}

//! Epoch fencing of sink files: output of a replaced attempt never lands.
//!
//! Every sink file `sink_<i>.csv` has a fence file `sink_<i>.csv.fence` holding the epoch of the
//! attempt that owns the output. A new attempt *claims* the output: under an exclusive lock on
//! the fence it records its epoch and truncates the data file to the length its checkpoint
//! committed (0 for a fresh start), dropping whatever an older attempt wrote after it. Every later write of any
//! attempt takes the same lock, re-reads the fence and refuses to write if a newer epoch has
//! claimed it. So an old attempt that wakes up after being replaced (a paused or partitioned
//! executor) fails its sink instead of appending stale rows.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The fence file of a data file.
pub fn fence_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".fence");
    PathBuf::from(p)
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

/// The epoch of the attempt that owns data file `path` (0 if none claimed it yet), read
/// from its fence file without taking the lock.
pub fn owner_epoch(path: &Path) -> io::Result<u64> {
    match File::open(fence_path(path)) {
        Ok(fence) => read_epoch(&fence),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// The longest fence a claim writes is a `u64` in decimal: 20 bytes.
const MAX_FENCE_BYTES: usize = 20;

/// Reads the epoch in `fence` with one positioned read: this runs before every append, so
/// it avoids the seek, size query and second read that reading the file to its end costs.
fn read_epoch(fence: &File) -> io::Result<u64> {
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
    let bad = |why: String| io::Error::new(io::ErrorKind::InvalidData, format!("bad fence: {why}"));
    if len > MAX_FENCE_BYTES {
        return Err(bad(format!("longer than {MAX_FENCE_BYTES} bytes")));
    }
    let text = std::str::from_utf8(&buf[..len])
        .map_err(|e| bad(format!("not text: {e}")))?
        .trim();
    if text.is_empty() {
        return Ok(0);
    }
    text.parse().map_err(|e| bad(format!("{text:?}: {e}")))
}

/// A data file owned by one attempt; writes fail once a newer attempt claims the file.
#[derive(Debug)]
pub struct FencedFile {
    data: File,
    fence: File,
    epoch: u64,
}

impl FencedFile {
    /// Claims `path` for attempt `epoch`: fails if a newer attempt already owns it, otherwise
    /// records the epoch and truncates the file to its first `keep` bytes (the length a
    /// checkpoint committed; 0 starts it empty). Fails if the file is shorter than `keep`:
    /// committed output is missing.
    pub fn claim(path: &Path, epoch: u64, keep: u64) -> io::Result<Self> {
        let fence = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(fence_path(path))?;
        let data = {
            let _lock = Locked::new(&fence)?;
            let owner = read_epoch(&fence)?;
            if owner > epoch {
                return Err(superseded(epoch, owner));
            }
            fence.set_len(0)?;
            (&fence).seek(SeekFrom::Start(0))?;
            (&fence).write_all(epoch.to_string().as_bytes())?;
            fence.sync_all()?;
            let mut data = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)?;
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
            data
        };
        Ok(Self { data, fence, epoch })
    }

    /// Flushes written data and the file's metadata to disk.
    pub fn sync(&self) -> io::Result<()> {
        self.data.sync_all()
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
    /// (`fdatasync`).
    pub fn sync_data(&self) -> io::Result<()> {
        self.data.sync_data()
    }
}

/// A byte range as the `off_t` pair the range system calls take; `None` past `i64::MAX`,
/// where no file has bytes.
#[cfg(target_os = "linux")]
fn file_range(offset: u64, len: u64) -> Option<(i64, i64)> {
    Some((i64::try_from(offset).ok()?, i64::try_from(len).ok()?))
}

fn superseded(epoch: u64, owner: u64) -> io::Error {
    io::Error::other(format!(
        "attempt of epoch {epoch} was superseded by epoch {owner}; refusing to write"
    ))
}

impl Write for FencedFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let _lock = Locked::new(&self.fence)?;
        let owner = read_epoch(&self.fence)?;
        if owner != self.epoch {
            return Err(superseded(self.epoch, owner));
        }
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

    #[test]
    fn newer_attempt_fences_the_older_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sink_0.csv");
        let mut old = FencedFile::claim(&path, 1, 0).unwrap();
        old.write_all(b"old row\n").unwrap();
        assert_eq!(owner_epoch(&path).unwrap(), 1);
        let mut new = FencedFile::claim(&path, 2, 0).unwrap();
        assert_eq!(owner_epoch(&path).unwrap(), 2);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"",
            "a claim starts the file empty"
        );
        let err = old.write_all(b"stale row\n").unwrap_err();
        assert!(err.to_string().contains("superseded by epoch 2"), "{err}");
        new.write_all(b"new row\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new row\n");
        let err = FencedFile::claim(&path, 1, 0).expect_err("an old attempt cannot claim");
        assert!(err.to_string().contains("superseded"), "{err}");
        // The same epoch may claim again (a task restarted within its attempt).
        FencedFile::claim(&path, 2, 0).unwrap();
    }

    #[test]
    fn a_claim_keeps_the_committed_prefix_and_appends_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sink_0.csv");
        let mut first = FencedFile::claim(&path, 1, 0).unwrap();
        first
            .write_all(b"committed\nlost after the checkpoint\n")
            .unwrap();
        let mut second = FencedFile::claim(&path, 2, 10).unwrap();
        second.write_all(b"replayed\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"committed\nreplayed\n");
        let err = FencedFile::claim(&path, 3, 1000).unwrap_err();
        assert!(err.to_string().contains("fewer than the 1000"), "{err}");
    }

    #[test]
    fn a_damaged_fence_refuses_writes_and_names_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sink_0.csv");
        let mut file = FencedFile::claim(&path, u64::MAX, 0).unwrap();
        assert_eq!(
            owner_epoch(&path).unwrap(),
            u64::MAX,
            "a 20-digit epoch reads back"
        );
        file.write_all(b"row\n").unwrap();
        for (fence, expected) in [
            (&b"123456789012345678901"[..], "longer than 20 bytes"),
            (b"12x", "\"12x\""),
            (&[0xff], "not text"),
        ] {
            std::fs::write(fence_path(&path), fence).unwrap();
            let err = file.write_all(b"row\n").unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            assert!(err.to_string().contains(expected), "{fence:?}: {err}");
        }
        std::fs::write(fence_path(&path), b"18446744073709551615").unwrap();
        file.write_all(b"row\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"row\nrow\n");
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
        let mut file = FencedFile::claim(&path, 1, 0).unwrap();
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
        let mut file = FencedFile::claim(&path, 1, 0).unwrap();
        file.write_all(b"one\ntwo\n").unwrap();
        file.start_writeback(0, 8).unwrap();
        // A range past the end is accepted too (the kernel clips it).
        file.start_writeback(4, 1 << 20).unwrap();
        file.sync_data().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one\ntwo\n");
    }
}

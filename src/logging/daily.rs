//! A log file per category and day: `connection.2026-12-01.log`, opened on the first line of
//! its day (no empty files), the previous day's closed as it is, and files older than
//! `keep_days` deleted when a new day starts (and at start). The day is the UTC or the local
//! date (`logging.timezone`), read from a [`LogClock`] so a test can roll it.
//!
//! log4rs's rolling appender names rolled files by index (`connection.0.log`), which tells an
//! operator nothing about which day a file holds; this one writes the date into the name.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Local, NaiveDate, Utc};
use log::Record;
use log4rs::append::Append;
use log4rs::encode::writer::simple::SimpleWriter;
use log4rs::encode::Encode;

/// Which calendar day a line belongs to (and the zone of its timestamp).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogZone {
    #[default]
    Utc,
    Local,
}

impl LogZone {
    pub fn day(self, at: DateTime<Utc>) -> NaiveDate {
        match self {
            LogZone::Utc => at.date_naive(),
            LogZone::Local => at.with_timezone(&Local).date_naive(),
        }
    }
}

/// The time source of the day boundary.
pub trait LogClock: Send + Sync + fmt::Debug {
    fn now(&self) -> DateTime<Utc>;
}

#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl LogClock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

#[derive(Debug)]
struct Open {
    day: NaiveDate,
    path: PathBuf,
    file: BufWriter<File>,
}

/// See the module docs.
pub struct DailyFile {
    dir: PathBuf,
    name: String,
    keep_days: u32,
    zone: LogZone,
    clock: Arc<dyn LogClock>,
    encoder: Box<dyn Encode>,
    open: Mutex<Option<Open>>,
}

impl fmt::Debug for DailyFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DailyFile")
            .field("dir", &self.dir)
            .field("name", &self.name)
            .field("keep_days", &self.keep_days)
            .field("zone", &self.zone)
            .finish()
    }
}

/// `<name>.<YYYY-MM-DD>.log` → the date, for this category only.
fn file_day(name: &str, file_name: &str) -> Option<NaiveDate> {
    let rest = file_name.strip_prefix(name)?.strip_prefix('.')?;
    let date = rest.strip_suffix(".log")?;
    if date.len() != 10 {
        return None;
    }
    NaiveDate::parse_from_str(date, "%Y-%m-%d").ok()
}

impl DailyFile {
    pub fn new(
        dir: &Path,
        name: &str,
        keep_days: u32,
        zone: LogZone,
        clock: Arc<dyn LogClock>,
        encoder: Box<dyn Encode>,
    ) -> Self {
        let file = DailyFile {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            keep_days: keep_days.max(1),
            zone,
            clock,
            encoder,
            open: Mutex::new(None),
        };
        // Files left by earlier runs past their days go now, not on the next roll.
        file.prune(zone.day(file.clock.now()));
        file
    }

    /// The file a line written now goes to.
    pub fn path_for(&self, day: NaiveDate) -> PathBuf {
        self.dir
            .join(format!("{}.{}.log", self.name, day.format("%Y-%m-%d")))
    }

    /// Deletes this category's files older than `keep_days` days (today counts as one).
    fn prune(&self, today: NaiveDate) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let oldest_kept = today - chrono::Duration::days(i64::from(self.keep_days) - 1);
        for entry in entries.flatten() {
            let file_name = entry.file_name();
            let Some(day) = file_name.to_str().and_then(|n| file_day(&self.name, n)) else {
                continue;
            };
            if day < oldest_kept {
                // A file that cannot be removed (open elsewhere on Windows) is tried again on
                // the next roll.
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    fn open_day(&self, day: NaiveDate) -> std::io::Result<Open> {
        let path = self.path_for(day);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        Ok(Open {
            day,
            path,
            file: BufWriter::new(file),
        })
    }
}

impl Append for DailyFile {
    fn append(&self, record: &Record) -> anyhow::Result<()> {
        let day = self.zone.day(self.clock.now());
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let rolled = match open.as_ref() {
            Some(o) => o.day != day,
            None => true,
        };
        if rolled {
            if let Some(mut old) = open.take() {
                let _ = old.file.flush();
            }
            let new = self
                .open_day(day)
                .map_err(|e| anyhow::anyhow!("log file {}: {e}", self.path_for(day).display()))?;
            *open = Some(new);
            drop(open);
            self.prune(day);
            open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        }
        let Some(o) = open.as_mut() else {
            return Ok(());
        };
        self.encoder
            .encode(&mut SimpleWriter(&mut o.file), record)?;
        // Each line reaches the file at once: a killed process leaves its last words behind.
        o.file
            .flush()
            .map_err(|e| anyhow::anyhow!("log file {}: {e}", o.path.display()))?;
        Ok(())
    }

    fn flush(&self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(o) = open.as_mut() {
            let _ = o.file.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use log4rs::encode::pattern::PatternEncoder;
    use std::sync::atomic::{AtomicI64, Ordering};

    /// A clock a test moves by hand.
    #[derive(Debug)]
    struct FakeClock(AtomicI64);

    impl FakeClock {
        fn at(rfc3339: &str) -> Arc<Self> {
            let t = DateTime::parse_from_rfc3339(rfc3339).expect("time");
            Arc::new(FakeClock(AtomicI64::new(t.timestamp_millis())))
        }
        fn set(&self, rfc3339: &str) {
            let t = DateTime::parse_from_rfc3339(rfc3339).expect("time");
            self.0.store(t.timestamp_millis(), Ordering::SeqCst);
        }
    }

    impl LogClock for FakeClock {
        fn now(&self) -> DateTime<Utc> {
            DateTime::from_timestamp_millis(self.0.load(Ordering::SeqCst)).expect("millis")
        }
    }

    fn write(a: &DailyFile, msg: &str) {
        a.append(
            &Record::builder()
                .level(log::Level::Info)
                .target("connection")
                .args(format_args!("{msg}"))
                .build(),
        )
        .expect("append");
    }

    /// A file's text with the platform's line ends as `\n` (`{n}` is `\r\n` on Windows).
    fn lines(path: &Path) -> String {
        std::fs::read_to_string(path)
            .expect("log")
            .replace("\r\n", "\n")
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn daily(dir: &Path, keep: u32, clock: Arc<FakeClock>) -> DailyFile {
        DailyFile::new(
            dir,
            "connection",
            keep,
            LogZone::Utc,
            clock,
            Box::new(PatternEncoder::new("{m}{n}")),
        )
    }

    #[test]
    fn each_day_has_its_dated_file_and_old_days_are_deleted() {
        let dir = tempfile::tempdir().expect("dir");
        // A file of another category and a stray file are never touched.
        std::fs::write(dir.path().join("audit.2026-01-01.log"), "x").expect("write");
        std::fs::write(dir.path().join("connection.notes.log"), "x").expect("write");
        let clock = FakeClock::at("2026-12-01T23:59:58Z");
        let a = daily(dir.path(), 2, clock.clone());
        // Nothing written yet: no file.
        assert_eq!(
            files(dir.path()),
            ["audit.2026-01-01.log", "connection.notes.log"]
        );
        write(&a, "one");
        clock.set("2026-12-01T23:59:59.999Z");
        write(&a, "two");
        clock.set("2026-12-02T00:00:00Z");
        write(&a, "three");
        let read = |d: &str| lines(&dir.path().join(format!("connection.{d}.log")));
        assert_eq!(read("2026-12-01"), "one\ntwo\n");
        assert_eq!(read("2026-12-02"), "three\n");
        // keep_days 2: on the 3rd, the 1st goes; the 2nd and the 3rd stay.
        clock.set("2026-12-03T08:00:00Z");
        write(&a, "four");
        assert_eq!(
            files(dir.path()),
            [
                "audit.2026-01-01.log",
                "connection.2026-12-02.log",
                "connection.2026-12-03.log",
                "connection.notes.log"
            ]
        );
    }

    #[test]
    fn a_restart_appends_to_the_day_and_prunes_what_an_earlier_run_left() {
        let dir = tempfile::tempdir().expect("dir");
        for d in ["2026-11-01", "2026-11-29", "2026-11-30"] {
            std::fs::write(dir.path().join(format!("connection.{d}.log")), "old\n").expect("write");
        }
        let clock = FakeClock::at("2026-11-30T10:00:00Z");
        let a = daily(dir.path(), 3, clock);
        write(&a, "new");
        assert_eq!(
            files(dir.path()),
            ["connection.2026-11-29.log", "connection.2026-11-30.log"]
        );
        assert_eq!(
            lines(&dir.path().join("connection.2026-11-30.log")),
            "old\nnew\n"
        );
    }

    #[test]
    fn the_local_zone_decides_the_day_by_local_time() {
        let at = DateTime::parse_from_rfc3339("2026-12-01T23:30:00Z")
            .expect("time")
            .with_timezone(&Utc);
        assert_eq!(
            LogZone::Utc.day(at),
            NaiveDate::from_ymd_opt(2026, 12, 1).expect("date")
        );
        assert_eq!(
            LogZone::Local.day(at),
            at.with_timezone(&Local).date_naive()
        );
    }

    #[test]
    fn only_this_categorys_dated_names_are_recognised() {
        assert_eq!(
            file_day("connection", "connection.2026-12-01.log"),
            NaiveDate::from_ymd_opt(2026, 12, 1)
        );
        assert_eq!(file_day("connection", "connection.log"), None);
        assert_eq!(file_day("connection", "connection.0.log"), None);
        assert_eq!(file_day("connection", "connections.2026-12-01.log"), None);
        assert_eq!(file_day("error", "connection.2026-12-01.log"), None);
    }
}

//! log4rs set-up: one dated file per category and day (`connection.2026-12-01.log`; categories
//! `connection`, `message`, `error`, `supervisor`, `audit`) kept `keep_days` days, everything
//! else in `tether.<day>.log` (created only if something is written there), and an optional
//! console summary (warnings and errors of every category). Timestamps and the day boundary are
//! UTC or local time (`logging.timezone`).
//!
//! Every appender is wrapped in [`Repeats`]: a warning or error repeated within
//! `REPEAT_WINDOW` is written `REPEAT_BURST` times, then counted, and one
//! `event=repeated count=N first=… last=… line="…"` line says what was left out — a broken link
//! or a flapping peer cannot fill a disk with one line.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use log::{LevelFilter, Record};
use log4rs::append::console::{ConsoleAppender, Target};
use log4rs::append::Append;
use log4rs::config::{Appender, Logger, Root};
use log4rs::encode::pattern::PatternEncoder;
use log4rs::filter::threshold::ThresholdFilter;

use crate::config::LoggingConfig;

mod daily;
pub use daily::{DailyFile, LogClock, LogZone, SystemClock};

/// The target of a fatal error's one line (error.log only, never the console).
pub const FATAL: &str = "fatal";

pub const CATEGORIES: [&str; 5] = ["connection", "message", "error", "supervisor", "audit"];

#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("logging.dir {dir}: {source}")]
    Dir { dir: String, source: std::io::Error },
    #[error("logging.dir: cannot write {file}: {message}")]
    Appender { file: String, message: String },
    #[error("logging: {0}")]
    Config(String),
}

/// A warning or error written this many times within `REPEAT_WINDOW`…
const REPEAT_BURST: u32 = 3;
/// …is then only counted until the window ends.
const REPEAT_WINDOW: Duration = Duration::from_secs(10);
/// Lines tracked at once (distinct warnings); past this the quiet ones are forgotten.
const REPEAT_KEYS: usize = 1024;

/// One kind of line within its window.
#[derive(Debug)]
struct Seen {
    since: Instant,
    written: u32,
    left_out: u64,
    first_left_out_ms: u64,
    last_left_out_ms: u64,
    sample: String,
    level: log::Level,
    target: String,
}

/// Wraps an appender; see the module docs.
#[derive(Debug)]
pub struct Repeats<A> {
    inner: A,
    seen: Mutex<HashMap<String, Seen>>,
    /// When ended windows were last looked for (at most once a second, on any line).
    swept: Mutex<Instant>,
}

/// Lines that differ only in numbers (`silent_ms=1234`, `count=3`) are the same line.
fn repeat_key(target: &str, msg: &str) -> String {
    let mut key = String::with_capacity(target.len() + msg.len() + 1);
    key.push_str(target);
    key.push(' ');
    let mut prev = ' ';
    for c in msg.chars() {
        if c.is_ascii_digit() && (prev == '=' || prev == '#') {
            if prev != '#' {
                key.push('#');
            }
            prev = '#';
            continue;
        }
        key.push(c);
        prev = c;
    }
    key
}

impl<A: Append> Repeats<A> {
    pub fn new(inner: A) -> Self {
        Repeats {
            inner,
            seen: Mutex::new(HashMap::new()),
            swept: Mutex::new(Instant::now()),
        }
    }

    fn summary(&self, s: &Seen) {
        if s.left_out == 0 {
            return;
        }
        let _ = self.inner.append(
            &Record::builder()
                .level(s.level)
                .target(&s.target)
                .args(format_args!(
                    "event=repeated count={} first={} last={} window_s={} line={}",
                    s.left_out,
                    tether_schemas::iso_from_millis(s.first_left_out_ms as i64),
                    tether_schemas::iso_from_millis(s.last_left_out_ms as i64),
                    REPEAT_WINDOW.as_secs(),
                    crate::security::log_value(&s.sample, 160)
                ))
                .build(),
        );
    }

    /// Writes the summaries of windows that have ended.
    fn close_windows(&self, seen: &mut HashMap<String, Seen>, now: Instant) {
        seen.retain(|_, s| {
            if now.duration_since(s.since) < REPEAT_WINDOW {
                return true;
            }
            self.summary(s);
            false
        });
    }
}

impl<A: Append> Append for Repeats<A> {
    fn append(&self, record: &Record) -> anyhow::Result<()> {
        let now = Instant::now();
        {
            let mut swept = self.swept.lock().unwrap_or_else(|p| p.into_inner());
            if now.duration_since(*swept) >= Duration::from_secs(1) {
                *swept = now;
                drop(swept);
                let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
                self.close_windows(&mut seen, now);
            }
        }
        if record.level() > log::Level::Warn {
            return self.inner.append(record);
        }
        let msg = record.args().to_string();
        let key = repeat_key(record.target(), &msg);
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = seen.get(&key) {
            if now.duration_since(s.since) >= REPEAT_WINDOW {
                if let Some(old) = seen.remove(&key) {
                    self.summary(&old);
                }
            }
        }
        if seen.len() >= REPEAT_KEYS {
            self.close_windows(&mut seen, now);
            if seen.len() >= REPEAT_KEYS {
                seen.retain(|_, s| s.left_out > 0);
            }
        }
        let s = seen.entry(key).or_insert_with(|| Seen {
            since: now,
            written: 0,
            left_out: 0,
            first_left_out_ms: 0,
            last_left_out_ms: 0,
            sample: msg,
            level: record.level(),
            target: record.target().to_string(),
        });
        if s.written < REPEAT_BURST {
            s.written += 1;
            drop(seen);
            return self.inner.append(record);
        }
        let ms = crate::security::unix_now_ms();
        if s.left_out == 0 {
            s.first_left_out_ms = ms;
        }
        s.left_out += 1;
        s.last_left_out_ms = ms;
        Ok(())
    }

    /// At shutdown (and whenever log4rs flushes): every pending count is written.
    fn flush(&self) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        for (_, s) in seen.drain() {
            self.summary(&s);
        }
        drop(seen);
        self.inner.flush();
    }
}

fn pattern(zone: LogZone) -> &'static str {
    match zone {
        LogZone::Utc => "{d(%Y-%m-%dT%H:%M:%S%.3fZ)(utc)} {l:<5} {t} {m}{n}",
        LogZone::Local => "{d(%Y-%m-%dT%H:%M:%S%.3f%:z)(local)} {l:<5} {t} {m}{n}",
    }
}

fn daily(cfg: &LoggingConfig, name: &str) -> DailyFile {
    DailyFile::new(
        &cfg.dir,
        name,
        cfg.keep_days,
        cfg.timezone,
        std::sync::Arc::new(SystemClock),
        Box::new(PatternEncoder::new(pattern(cfg.timezone))),
    )
}

/// Installs the global logger (once per process; the `log` facade owns it).
pub fn init(cfg: &LoggingConfig, console_prefix: &str) -> Result<log4rs::Handle, LoggingError> {
    std::fs::create_dir_all(&cfg.dir).map_err(|source| LoggingError::Dir {
        dir: cfg.dir.display().to_string(),
        source,
    })?;
    // Files are opened on their first line; a directory that cannot be written to is said now.
    let probe = cfg.dir.join(".tether-write-test");
    std::fs::write(&probe, b"").map_err(|e| LoggingError::Appender {
        file: probe.display().to_string(),
        message: e.to_string(),
    })?;
    let _ = std::fs::remove_file(&probe);
    let level: LevelFilter = cfg.level.parse().unwrap_or(LevelFilter::Info);
    let mut builder = log4rs::Config::builder();
    let mut root = Root::builder().appender("main");
    builder = builder
        .appender(Appender::builder().build("main", Box::new(Repeats::new(daily(cfg, "tether")))));
    if cfg.console {
        let console = ConsoleAppender::builder()
            .target(Target::Stderr)
            .encoder(Box::new(PatternEncoder::new(&format!(
                "{{d(%H:%M:%S)}} {{l:<5}} {console_prefix}{{t}} {{m}}{{n}}"
            ))))
            .build();
        builder = builder.appender(
            Appender::builder()
                .filter(Box::new(ThresholdFilter::new(LevelFilter::Warn)))
                .build("console", Box::new(Repeats::new(console))),
        );
        root = root.appender("console");
    }
    for cat in CATEGORIES {
        builder = builder
            .appender(Appender::builder().build(cat, Box::new(Repeats::new(daily(cfg, cat)))));
        let mut logger = Logger::builder().appender(cat).additive(false);
        if cfg.console {
            logger = logger.appender("console");
        }
        builder = builder.logger(logger.build(cat, level));
    }
    // The process's last words (a fatal start error): on error.log only — the console already
    // shows them as the command's own error.
    builder = builder.logger(
        Logger::builder()
            .appender("error")
            .additive(false)
            .build(FATAL, LevelFilter::Error),
    );
    // Chatty dependencies stay at warn.
    for noisy in ["actix_server", "actix_http", "awc", "mio", "h2"] {
        builder = builder.logger(Logger::builder().build(noisy, LevelFilter::Warn));
    }
    let config = builder
        .build(root.build(level))
        .map_err(|e| LoggingError::Config(e.to_string()))?;
    log4rs::init_config(config).map_err(|e| LoggingError::Config(e.to_string()))
}

/// Logs panics (location and message) on the `error` category before the default hook runs.
pub fn install_panic_logger(also_stderr: bool) {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let payload = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let thread = std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .to_string();
        log::error!(target: "error", "event=panic thread={thread} location={location} message={payload:?}");
        if also_stderr {
            previous(info);
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// An appender that keeps what it was given.
    #[derive(Debug, Default, Clone)]
    struct Keep(Arc<Mutex<Vec<String>>>);

    impl Append for Keep {
        fn append(&self, r: &Record) -> anyhow::Result<()> {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(format!("{} {}", r.target(), r.args()));
            Ok(())
        }
        fn flush(&self) {}
    }

    fn log(a: &impl Append, level: log::Level, msg: &str) {
        a.append(
            &Record::builder()
                .level(level)
                .target("connection")
                .args(format_args!("{msg}"))
                .build(),
        )
        .expect("append");
    }

    #[test]
    fn a_repeated_warning_is_written_a_few_times_then_counted() {
        let keep = Keep::default();
        let r = Repeats::new(keep.clone());
        for i in 0..2_835 {
            log(
                &r,
                log::Level::Warn,
                &format!("clinic=c-1 event=write_error n={i} error=\"Broken pipe\""),
            );
        }
        // Other lines are not held back.
        log(&r, log::Level::Warn, "clinic=c-2 event=write_error n=1");
        log(&r, log::Level::Info, "clinic=c-1 event=connected");
        r.flush();
        let lines = keep.0.lock().expect("lines").clone();
        let errors = lines
            .iter()
            .filter(|l| l.contains("clinic=c-1 event=write_error") && !l.contains("event=repeated"))
            .count();
        assert_eq!(errors, REPEAT_BURST as usize, "{lines:#?}");
        let summary = lines
            .iter()
            .find(|l| l.contains("event=repeated"))
            .expect("a summary line");
        assert!(summary.contains("count=2832"), "{summary}");
        assert!(
            summary.contains("first=") && summary.contains("last="),
            "{summary}"
        );
        assert!(lines.iter().any(|l| l.contains("clinic=c-2")));
        assert!(lines.iter().any(|l| l.contains("event=connected")));
    }

    #[test]
    fn lines_differing_in_numbers_only_are_one_kind() {
        assert_eq!(
            repeat_key("c", "event=x silent_ms=1234 limit=30000"),
            repeat_key("c", "event=x silent_ms=99 limit=30000")
        );
        assert_ne!(
            repeat_key("c", "clinic=c-1 event=x"),
            repeat_key("c", "clinic=c-2 event=x")
        );
    }
}

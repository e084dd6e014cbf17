//! log4rs set-up: one daily-rolled file per category (`connection`, `message`, `error`,
//! `supervisor`, `audit`) kept `keep_days` days, everything else in `tether.log`, and an
//! optional console summary (warnings and errors of every category).

use std::path::Path;

use log::LevelFilter;
use log4rs::append::console::{ConsoleAppender, Target};
use log4rs::append::rolling_file::policy::compound::roll::fixed_window::FixedWindowRoller;
use log4rs::append::rolling_file::policy::compound::trigger::time::{
    TimeTrigger, TimeTriggerConfig, TimeTriggerInterval,
};
use log4rs::append::rolling_file::policy::compound::CompoundPolicy;
use log4rs::append::rolling_file::RollingFileAppender;
use log4rs::config::{Appender, Logger, Root};
use log4rs::encode::pattern::PatternEncoder;
use log4rs::filter::threshold::ThresholdFilter;

use crate::config::LoggingConfig;

pub const CATEGORIES: [&str; 5] = ["connection", "message", "error", "supervisor", "audit"];

#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("logging.dir {dir}: {source}")]
    Dir { dir: String, source: std::io::Error },
    #[error("log file {file}: {message}")]
    Appender { file: String, message: String },
    #[error("logging: {0}")]
    Config(String),
}

const PATTERN: &str = "{d(%Y-%m-%dT%H:%M:%S%.3fZ)(utc)} {l:<5} {t} {m}{n}";

fn rolling(dir: &Path, name: &str, keep: u32) -> Result<RollingFileAppender, LoggingError> {
    let file = dir.join(format!("{name}.log"));
    let pattern = dir.join(format!("{name}.{{}}.log"));
    let trigger = TimeTrigger::new(TimeTriggerConfig {
        interval: TimeTriggerInterval::Day(1),
        modulate: true,
        max_random_delay: 0,
    });
    let roller = FixedWindowRoller::builder()
        .build(&pattern.display().to_string(), keep)
        .map_err(|e| LoggingError::Appender {
            file: pattern.display().to_string(),
            message: e.to_string(),
        })?;
    RollingFileAppender::builder()
        .encoder(Box::new(PatternEncoder::new(PATTERN)))
        .build(
            &file,
            Box::new(CompoundPolicy::new(Box::new(trigger), Box::new(roller))),
        )
        .map_err(|e| LoggingError::Appender {
            file: file.display().to_string(),
            message: e.to_string(),
        })
}

/// Installs the global logger (once per process; the `log` facade owns it).
pub fn init(cfg: &LoggingConfig, console_prefix: &str) -> Result<log4rs::Handle, LoggingError> {
    std::fs::create_dir_all(&cfg.dir).map_err(|source| LoggingError::Dir {
        dir: cfg.dir.display().to_string(),
        source,
    })?;
    let level: LevelFilter = cfg.level.parse().unwrap_or(LevelFilter::Info);
    let mut builder = log4rs::Config::builder();
    let mut root = Root::builder().appender("main");
    builder = builder.appender(Appender::builder().build(
        "main",
        Box::new(rolling(&cfg.dir, "tether", cfg.keep_days)?),
    ));
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
                .build("console", Box::new(console)),
        );
        root = root.appender("console");
    }
    for cat in CATEGORIES {
        builder = builder.appender(
            Appender::builder().build(cat, Box::new(rolling(&cfg.dir, cat, cfg.keep_days)?)),
        );
        let mut logger = Logger::builder().appender(cat).additive(false);
        if cfg.console {
            logger = logger.appender("console");
        }
        builder = builder.logger(logger.build(cat, level));
    }
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

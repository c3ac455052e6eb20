//! The configuration file and SIGHUP.
//!
//! `--config FILE` names a file of `VIOS_*=value` lines, the syntax of
//! `/etc/default/vios-host-bridge` (which the packages use as that file):
//! `#` comments, blank lines, values optionally in single or double quotes.
//! Each variable means what it means in the environment (`--help` lists
//! them). With a file, the process environment's `VIOS_*` variables are not
//! read at all: the file is the one source besides the command line, which
//! wins over it. The file is read at start-up and again on every SIGHUP, so
//! a reload sees exactly what a restart would.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches};

use crate::config::Cli;

/// Parses the command line, and the configuration file if it names one
/// (`--config` or `VIOS_CONFIG`), into the daemon's settings.
pub fn load(argv: &[OsString]) -> Result<Cli, clap::Error> {
    let Some(file) = config_file(argv) else {
        return Cli::try_parse_from_args(argv);
    };
    let vars = read_env_file(&file).map_err(|e| {
        Cli::command().error(
            clap::error::ErrorKind::Io,
            format!("--config {}: {e}", file.display()),
        )
    })?;
    // Which options the command line gives: those the file must not touch.
    let without_env = || Cli::command().mut_args(|a| a.env(None));
    let given: HashSet<String> = without_env()
        .ignore_errors(true)
        .try_get_matches_from(argv)
        .map(|m| {
            m.ids()
                .filter(|id| m.value_source(id.as_str()) == Some(ValueSource::CommandLine))
                .map(|id| id.as_str().to_owned())
                .collect()
        })
        .unwrap_or_default();
    let mut full: Vec<OsString> = argv.to_vec();
    let cmd = Cli::command();
    let mut unknown: Vec<&str> = vars.keys().map(String::as_str).collect();
    for arg in cmd.get_arguments() {
        let Some(env) = arg.get_env().and_then(|e| e.to_str()) else {
            continue;
        };
        unknown.retain(|v| *v != env);
        let Some(value) = vars.get(env) else { continue };
        if given.contains(arg.get_id().as_str()) || env == "VIOS_CONFIG" {
            continue;
        }
        let long = arg
            .get_long()
            .expect("every option with a variable has a long name");
        if arg.get_action().takes_values() {
            full.push(format!("--{long}={value}").into());
        } else if vios_common::cli::parse_bool(value).map_err(|e| {
            Cli::command().error(
                clap::error::ErrorKind::InvalidValue,
                format!("{env} in {}: {e}", file.display()),
            )
        })? {
            full.push(format!("--{long}").into());
        }
    }
    // Variables the daemon does not know: a typo would otherwise be silent.
    let unknown: Vec<&str> = unknown
        .into_iter()
        .filter(|v| v.starts_with("VIOS_") && *v != "VIOS_HOST_ARGS")
        .collect();
    if !unknown.is_empty() {
        return Err(Cli::command().error(
            clap::error::ErrorKind::UnknownArgument,
            format!("{}: unknown variable(s) {}", file.display(), unknown.join(", ")),
        ));
    }
    let m = without_env().try_get_matches_from(full)?;
    let mut cli = Cli::from_arg_matches(&m)?;
    cli.config = Some(file);
    Ok(cli)
}

impl Cli {
    fn try_parse_from_args(argv: &[OsString]) -> Result<Cli, clap::Error> {
        let m = Cli::command().try_get_matches_from(argv)?;
        Cli::from_arg_matches(&m)
    }
}

/// `--config FILE`, `--config=FILE`, or `VIOS_CONFIG`.
fn config_file(argv: &[OsString]) -> Option<PathBuf> {
    let mut it = argv.iter().skip(1);
    while let Some(a) = it.next() {
        let a = a.to_string_lossy();
        if a == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = a.strip_prefix("--config=") {
            return Some(v.into());
        }
    }
    std::env::var_os("VIOS_CONFIG")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// `KEY=value` lines, shell-style: comments, blank lines, quotes.
pub fn read_env_file(path: &Path) -> Result<BTreeMap<String, String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let mut vars = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| format!("line {}: expected NAME=value, got {line:?}", i + 1))?;
        if k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(format!("line {}: {k:?} is not a variable name", i + 1));
        }
        let v = v.trim();
        let v = if (v.starts_with('"') && v.ends_with('"') || v.starts_with('\'') && v.ends_with('\''))
            && v.len() >= 2
        {
            &v[1..v.len() - 1]
        } else {
            v
        };
        vars.insert(k.to_owned(), v.to_owned());
    }
    Ok(vars)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<OsString> {
        std::iter::once("vios-host-bridge")
            .chain(a.iter().copied())
            .map(OsString::from)
            .collect()
    }

    fn file(tag: &str, text: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("vios-reload-{tag}-{}", std::process::id()));
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn the_file_is_read_like_the_environment_and_the_command_line_wins() {
        let f = file(
            "basic",
            "# comment\n\nVIOS_SERVICES=\"amqp=127.0.0.1:5672;other=127.0.0.1:5673\"\nVIOS_GUESTS='vm1=/run/a'\n\
             VIOS_LIBVIRT=yes\nVIOS_MAX_STREAMS=10\nVIOS_HOST_ARGS=\"\"\n",
        );
        let cli = load(&args(&["--config", f.to_str().unwrap(), "--max-streams", "20"])).unwrap();
        assert_eq!(cli.services.len(), 2);
        assert_eq!(cli.guests[0].name, "vm1");
        assert!(cli.libvirt);
        assert_eq!(cli.max_streams, 20, "the command line wins");
        assert_eq!(cli.config.as_deref(), Some(f.as_path()));
        std::fs::remove_file(f).unwrap();
    }

    #[test]
    fn a_bad_file_is_an_error_that_names_the_line() {
        let f = file("bad", "VIOS_SERVICES=amqp=127.0.0.1:5672\nthis is not a line\n");
        let e = load(&args(&["--config", f.to_str().unwrap()]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2"), "{e}");
        std::fs::write(&f, "VIOS_SERVICES=amqp=127.0.0.1:5672\nVIOS_SERVISES=x\n").unwrap();
        let e = load(&args(&["--config", f.to_str().unwrap(), "--guest", "a=/s"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("VIOS_SERVISES"), "{e}");
        std::fs::write(&f, "VIOS_SERVICES=amqp=nohost\n").unwrap();
        let e = load(&args(&["--config", f.to_str().unwrap(), "--guest", "a=/s"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nohost"), "{e}");
        std::fs::remove_file(f).unwrap();
        let e = load(&args(&["--config", "/nonexistent/vios.conf"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/vios.conf"), "{e}");
    }
}

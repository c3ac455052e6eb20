//! `vios-manpage [--date YYYY-MM-DD] OUTDIR`: writes `vios-host-bridge.8`
//! and `vios-guest-bridge.8` into OUTDIR.
//!
//! The pages come from the daemons' own clap definitions (`config::Cli`,
//! and `vios_common::daemon::StatusCli` for the `status` subcommand), so
//! their options are exactly those of `--help`; `scripts/package` runs this
//! at build time. What `--help` does not say (files, signals, exit status,
//! the systemd units) is added here as roff sections.
#![forbid(unsafe_code)]

use std::io;
use std::path::PathBuf;

use clap::CommandFactory;
use clap_mangen::roff::{bold, italic, roman, Inline, Roff};
use clap_mangen::Man;
use vios_common::daemon::{StatusCli, EXIT_CONFIG, EXIT_FAILED};

/// What a page says beyond the command line.
struct Page {
    cmd: clap::Command,
    /// The other daemon (SEE ALSO).
    other: &'static str,
    /// The status subcommand's synopsis (after the program name).
    status_synopsis: &'static str,
    /// Where the control socket is by default (STATUS).
    control_default: &'static str,
    environment: &'static [(&'static str, &'static str)],
    files: &'static [(&'static str, &'static str)],
    signals: &'static [(&'static str, &'static str)],
}

fn host() -> Page {
    Page {
        cmd: vios_host_bridge::config::Cli::command(),
        other: "vios-guest-bridge",
        status_synopsis: "status [--json] [--guest NAME] [--streams] [--control PATH]",
        control_default: vios_host_bridge::config::DEFAULT_CONTROL,
        environment: &[
            (
                "VIOS_*",
                "Every option above that names a variable can be set through it instead. With \
                 --config (or VIOS_CONFIG) the variables come from that file and the process \
                 environment's VIOS_* variables are not read; options on the command line win \
                 over both.",
            ),
            (
                "RUST_LOG",
                "Log level: error, warn, info (the default) or debug; or a filter such as \
                 vios_host_bridge=debug.",
            ),
            (
                "NOTIFY_SOCKET, WATCHDOG_USEC",
                "Set by systemd for Type=notify and WatchdogSec=: the daemon reports READY=1 once \
                 it serves, STATUS= lines (guests, sessions, streams) and WATCHDOG=1 from its \
                 event loop.",
            ),
            (
                "JOURNAL_STREAM",
                "Set by systemd when standard error is the journal: log lines then carry their \
                 syslog priority (<3> to <7>) and no timestamp of their own.",
            ),
        ],
        files: &[
            (
                "/etc/default/vios-host-bridge",
                "The configuration: VIOS_*=value lines, read by the daemon itself (--config, as the \
                 unit and the init script give it) at start and again on every SIGHUP. \
                 VIOS_HOST_ARGS holds extra command-line arguments and RUST_LOG the log level; \
                 both apply at the next start.",
            ),
            (
                "/lib/systemd/system/vios-host-bridge.service",
                "The systemd unit: runs the daemon as the unprivileged user vios-bridge, with no \
                 capabilities, reaching loopback addresses only (IPAddressAllow=; add a drop-in \
                 for services elsewhere).",
            ),
            ("/etc/init.d/vios-host-bridge", "The init script for hosts without systemd; it logs to /var/log/vios-host-bridge.log."),
            ("/run/vios/vios-host-bridge.sock", "The control socket that the status subcommand asks (mode 0660)."),
            (
                "/run/libvirt/qemu/channel, /var/lib/libvirt/qemu/channel/target",
                "libvirt's channel directories, scanned with --libvirt. The user vios-bridge \
                 reaches them as a member of the group libvirt-qemu.",
            ),
            ("/usr/share/doc/vios-host-bridge/", "OPERATIONS.md (installing, channels, services, troubleshooting), LIFECYCLE.md and PROTOCOL.md."),
        ],
        signals: &[
            ("SIGTERM, SIGINT", "Orderly stop: GOAWAY to every guest, --shutdown-grace for streams to finish, reset the rest, exit 0."),
            (
                "SIGHUP",
                "Read the configuration file again and apply services, --allow rules, guest \
                 identities and the guest list (a file with an error is refused and the running \
                 configuration kept); rescan guest directories at once.",
            ),
            ("SIGUSR1", "Write the status (guests, channels, sessions, streams) to the log."),
        ],
    }
}

fn guest() -> Page {
    Page {
        cmd: vios_guest_bridge::config::Cli::command(),
        other: "vios-host-bridge",
        status_synopsis: "status [--json] [--streams] [--channel NAME] [--control PATH]",
        control_default: "/run/vios/vios-guest-bridge.CHANNEL.sock",
        environment: &[
            ("VIOS_*", "Every option above that names a variable can be set through it instead; options on the command line win."),
            (
                "RUST_LOG",
                "Log level: error, warn, info (the default) or debug; or a filter such as \
                 vios_guest_bridge=debug.",
            ),
            (
                "NOTIFY_SOCKET, WATCHDOG_USEC",
                "Set by systemd for Type=notify and WatchdogSec=: the daemon reports READY=1 once \
                 its listeners are bound, STATUS= lines and WATCHDOG=1 from its event loop.",
            ),
            (
                "JOURNAL_STREAM",
                "Set by systemd when standard error is the journal: log lines then carry their \
                 syslog priority (<3> to <7>) and no timestamp of their own.",
            ),
        ],
        files: &[
            (
                "/etc/default/vios-guest-bridge, /etc/default/vios-guest-bridge.PORT",
                "VIOS_* variables for every instance, and for the instance on one port; \
                 VIOS_GUEST_ARGS holds extra command-line arguments.",
            ),
            (
                "/lib/systemd/system/vios-guest-bridge@.service",
                "The systemd unit, one instance per port (vios-guest-bridge@org.qpid.vios.0): runs \
                 the daemon as the unprivileged user vios-bridge with no capabilities. Nothing to \
                 enable: the udev rule starts it.",
            ),
            (
                "/lib/udev/rules.d/90-vios-guest-bridge.rules",
                "Gives each Vios port (org.qpid.vios.*) to the group vios-bridge and starts its \
                 unit, at boot and on hot-plug.",
            ),
            ("/etc/init.d/vios-guest-bridge", "The init script for guests without systemd (one port, VIOS_CHANNEL); it logs to /var/log/vios-guest-bridge.log."),
            ("/sys/class/virtio-ports/*/name", "Where a port name given to --channel is looked up."),
            ("/run/vios/", "Control sockets (vios-guest-bridge.CHANNEL.sock, mode 0660) and, by convention, unix-socket listeners."),
            ("/usr/share/doc/vios-guest-bridge/", "OPERATIONS.md, LIFECYCLE.md and PROTOCOL.md."),
        ],
        signals: &[
            ("SIGTERM, SIGINT", "Orderly stop: GOAWAY to the host, --shutdown-grace for streams to finish, reset the rest, exit 0."),
            ("SIGUSR1", "Write the status (session, streams, waiting clients) to the log."),
            ("SIGHUP", "Ignored (logged): there is nothing to reload."),
        ],
    }
}

/// Renders one chunk; every chunk but the first loses roff's preamble.
fn chunk(doc: &mut String, render: impl FnOnce(&mut Vec<u8>) -> io::Result<()>) -> io::Result<()> {
    let mut buf = Vec::new();
    render(&mut buf)?;
    let text = String::from_utf8(buf).map_err(io::Error::other)?;
    let preamble = Roff::new().render();
    match text.strip_prefix(&preamble) {
        Some(rest) if !doc.is_empty() => doc.push_str(rest),
        _ => doc.push_str(&text),
    }
    Ok(())
}

/// A section of tagged paragraphs.
fn tagged(roff: &mut Roff, heading: &str, items: &[(&str, &str)]) {
    roff.control("SH", [heading]);
    for (tag, text) in items {
        roff.control("TP", []);
        roff.text([bold(*tag)]);
        roff.text([roman(*text)]);
    }
}

/// `--help`'s after-help text as roff: a line indented by two spaces is an
/// example, kept as it is; "Heading: text" starts a paragraph.
fn after_help(roff: &mut Roff, text: &str) {
    let mut literal = false;
    for line in text.lines() {
        let example = line.starts_with("  ");
        if example != literal {
            if example {
                roff.control("RS", ["4"]);
                roff.control("nf", []);
            } else {
                roff.control("fi", []);
                roff.control("RE", []);
            }
            literal = example;
        }
        if example {
            roff.text([roman(line.trim_start())]);
        } else if line.trim().is_empty() {
            continue;
        } else {
            let starts_paragraph = line.split_once(": ").is_some_and(|(h, _)| {
                !h.is_empty() && h.len() < 20 && h.starts_with(|c: char| c.is_ascii_uppercase())
            }) || line.ends_with(':');
            if starts_paragraph {
                roff.control("PP", []);
            }
            roff.text([roman(line)]);
        }
    }
    if literal {
        roff.control("fi", []);
        roff.control("RE", []);
    }
}

/// The whole page, as roff source.
fn render(page: &Page, date: &str) -> io::Result<String> {
    let cmd = page.cmd.clone();
    let name = cmd.get_name().to_owned();
    let version = cmd.get_version().unwrap_or_default().to_owned();
    let man = Man::new(cmd.clone())
        .section("8")
        .date(date)
        .source(format!("vios-bridge {version}"))
        .manual("System Administration");
    let mut doc = String::new();
    chunk(&mut doc, |w| man.render_title(w))?;
    // Ragged right: some option values are long words (a service's syntax)
    // that a justified 80-column line cannot hold without groff warning. No
    // hyphenation: option names are not to be split.
    doc.push_str(".ad l\n.nh\n");
    chunk(&mut doc, |w| man.render_name_section(w))?;
    chunk(&mut doc, |w| man.render_synopsis_section(w))?;

    let mut roff = Roff::new();
    roff.control("br", []);
    roff.text([bold(name.as_str()), roman(" "), roman(page.status_synopsis)]);
    chunk(&mut doc, |w| roff.to_writer(w))?;

    chunk(&mut doc, |w| man.render_description_section(w))?;
    chunk(&mut doc, |w| man.render_options_section(w))?;

    // The status subcommand: its own clap definition, shared by both daemons.
    let status_cmd = StatusCli::command().bin_name(format!("{name} status"));
    let mut roff = Roff::new();
    roff.control("SH", ["STATUS"]);
    roff.text([
        bold(format!("{name} status")),
        roman(format!(
            " asks the running daemon through its control socket (by default {}).",
            page.control_default
        )),
    ]);
    if let Some(about) = status_cmd.get_about() {
        roff.text([roman(format!("{about}."))]);
    }
    roff.text([roman("Its options:")]);
    chunk(&mut doc, |w| roff.to_writer(w))?;
    let status = Man::new(status_cmd.clone());
    let mut options = Vec::new();
    status.render_options_section(&mut options)?;
    let options = String::from_utf8(options).map_err(io::Error::other)?;
    // Its options under STATUS, not as a second OPTIONS section.
    let options = options.replacen(".SH OPTIONS\n", ".RS 4\n", 1) + ".RE\n";
    chunk(&mut doc, |w| {
        use io::Write;
        w.write_all(options.as_bytes())
    })?;
    if let Some(text) = status_cmd.get_after_help() {
        let mut roff = Roff::new();
        roff.control("PP", []);
        roff.text([roman(text.to_string())]);
        chunk(&mut doc, |w| roff.to_writer(w))?;
    }

    let mut roff = Roff::new();
    if let Some(text) = cmd.get_after_long_help().or_else(|| cmd.get_after_help()) {
        roff.control("SH", ["NOTES"]);
        after_help(&mut roff, &text.to_string());
    }
    tagged(&mut roff, "ENVIRONMENT", page.environment);
    tagged(&mut roff, "FILES", page.files);
    tagged(&mut roff, "SIGNALS", page.signals);
    let exit = [
        ("0".to_owned(), "An orderly stop (SIGTERM or SIGINT).".to_owned()),
        (
            EXIT_FAILED.to_string(),
            "The daemon failed while running (its supervisor should start it again).".to_owned(),
        ),
        (
            EXIT_CONFIG.to_string(),
            "A configuration error, reported with what was expected; starting again would fail \
             the same way (the unit says RestartPreventExitStatus=2)."
                .to_owned(),
        ),
    ];
    let exit: Vec<(&str, &str)> = exit.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    tagged(&mut roff, "EXIT STATUS", &exit);
    roff.control("PP", []);
    roff.text([roman(
        "The status subcommand exits 0 when every channel has a session, 1 when some have not, \
         and 2 when the daemon cannot be reached.",
    )]);
    roff.control("SH", ["SEE ALSO"]);
    let see_also: Vec<Inline> = [
        (page.other, "8"),
        ("systemd.service", "5"),
        ("systemd.exec", "5"),
        ("qemu-system-x86_64", "1"),
        ("virsh", "1"),
    ]
    .iter()
    .enumerate()
    .flat_map(|(i, (n, s))| {
        let sep = if i == 0 { "" } else { ", " };
        [roman(sep), bold(*n), roman(format!("({s})"))]
    })
    .collect();
    roff.text(see_also);
    roff.control("PP", []);
    roff.text([
        roman("The Vios protocol: "),
        italic(format!("/usr/share/doc/{name}/PROTOCOL.md")),
        roman("."),
    ]);
    chunk(&mut doc, |w| roff.to_writer(w))?;
    chunk(&mut doc, |w| man.render_version_section(w))?;
    Ok(break_long_words(&doc))
}

/// Text lines' words too long for an 80-column page (a service's syntax,
/// `NAME=HOST:PORT[|HOST:PORT...][,proxy=v2]...`) get break points (`\:`)
/// after `|` and `,`, since hyphenation is off.
fn break_long_words(doc: &str) -> String {
    let mut out = String::with_capacity(doc.len());
    for line in doc.lines() {
        if line.starts_with('.') || line.starts_with('\'') {
            out.push_str(line);
        } else {
            let words: Vec<String> = line
                .split(' ')
                .map(|w| {
                    if w.len() > 40 {
                        w.replace('|', "|\\:").replace(',', ",\\:")
                    } else {
                        w.to_owned()
                    }
                })
                .collect();
            out.push_str(&words.join(" "));
        }
        out.push('\n');
    }
    out
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut date = String::new();
    let mut out: Option<PathBuf> = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--date" => date = args.next().unwrap_or_default(),
            "-h" | "--help" => {
                println!(
                    "usage: vios-manpage [--date YYYY-MM-DD] OUTDIR\n\nWrites vios-host-bridge.8 and \
                     vios-guest-bridge.8 (roff, section 8) into OUTDIR from the daemons' clap \
                     definitions."
                );
                return;
            }
            _ if out.is_none() && !a.starts_with('-') => out = Some(a.into()),
            _ => {
                eprintln!("vios-manpage: unexpected argument {a:?} (try --help)");
                std::process::exit(2);
            }
        }
    }
    let Some(out) = out else {
        eprintln!("vios-manpage: no output directory (try --help)");
        std::process::exit(2);
    };
    for page in [host(), guest()] {
        let name = page.cmd.get_name().to_owned();
        let path = out.join(format!("{name}.8"));
        let written = render(&page, &date).and_then(|doc| std::fs::write(&path, doc));
        if let Err(e) = written {
            eprintln!("vios-manpage: {}: {e}", path.display());
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every long option of both daemons, and of `status`, is on its page.
    #[test]
    fn every_long_option_is_on_the_page() {
        for page in [host(), guest()] {
            let doc = render(&page, "2026-01-01").unwrap();
            let cmds = [page.cmd.clone(), StatusCli::command()];
            for cmd in cmds {
                for arg in cmd.get_arguments() {
                    if let Some(long) = arg.get_long() {
                        let roff = format!("\\-\\-{}", long.replace('-', "\\-"));
                        assert!(doc.contains(&roff), "{}: --{long} missing", page.cmd.get_name());
                    }
                }
            }
            for section in [
                "SYNOPSIS",
                "OPTIONS",
                "STATUS",
                "FILES",
                "SIGNALS",
                "EXIT STATUS",
                "SEE ALSO",
            ] {
                assert!(
                    doc.contains(&format!(".SH {section}")) || doc.contains(&format!(".SH \"{section}\""))
                );
            }
        }
    }
}

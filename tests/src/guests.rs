//! Driving `vios-guests` (many guests in one process) from a test: start it
//! on a guest directory, send it commands, read its one-line JSON answers.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

use crate::bin;
use crate::vm::json_num;

pub struct Guests {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
}

impl Guests {
    /// `n` guests numbered from `first`, in libvirt's layout under `dir`;
    /// the tool's notes go to `log`.
    pub fn start(dir: &Path, first: usize, n: usize, log: &Path) -> Guests {
        let mut child = Command::new(bin("vios-guests"))
            .arg("--dir")
            .arg(dir)
            .args(["--first", &first.to_string(), "--guests", &n.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).expect("log file"))
            .spawn()
            .expect("spawn vios-guests");
        let stdout = child.stdout.take().expect("stdout");
        let stdin = child.stdin.take().expect("stdin");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Guests { child, stdin, lines }
    }

    /// Sends a command and returns its answer (a JSON line).
    pub fn command(&mut self, cmd: &str, timeout: Duration) -> String {
        writeln!(self.stdin, "{cmd}").expect("vios-guests stdin");
        self.stdin.flush().unwrap();
        self.lines
            .recv_timeout(timeout)
            .unwrap_or_else(|e| panic!("vios-guests: no answer to {cmd:?} within {timeout:?}: {e}"))
    }

    /// `report`, as a number field.
    pub fn field(&mut self, name: &str) -> f64 {
        json_num(&self.command("report", Duration::from_secs(10)), name)
    }
}

impl Drop for Guests {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        std::thread::sleep(Duration::from_millis(50));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

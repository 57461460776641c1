//! A temp data dir and a runner that shows everything on failure (ripgrep-style).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub struct Till {
    pub dir: tempfile::TempDir,
}

pub struct Run {
    pub args: Vec<String>,
    pub out: Output,
}

impl Run {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.stdout).trim().to_string()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).to_string()
    }
    pub fn code(&self) -> i32 {
        self.out.status.code().unwrap_or(-1)
    }
    fn describe(&self) -> String {
        format!(
            "till {:?}\nexit: {:?}\nstdout:\n{}\nstderr:\n{}",
            self.args,
            self.out.status,
            self.stdout(),
            self.stderr()
        )
    }
    /// Asserts success and returns stdout.
    pub fn ok(&self) -> String {
        assert!(
            self.out.status.success(),
            "expected success\n{}",
            self.describe()
        );
        self.stdout()
    }
    /// Asserts exit code `code` and returns stderr.
    pub fn fails_with(&self, code: i32) -> String {
        assert_eq!(self.code(), code, "wrong exit code\n{}", self.describe());
        self.stderr()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok())
            .unwrap_or_else(|e| panic!("not JSON ({e})\n{}", self.describe()))
    }
}

impl Till {
    pub fn new() -> Self {
        Till {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn bin() -> &'static Path {
        Path::new(env!("CARGO_BIN_EXE_till"))
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(Self::bin());
        c.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("TILL_DATA_DIR", self.data_dir())
            .current_dir(self.dir.path());
        c
    }

    pub fn run(&self, args: &[&str]) -> Run {
        self.run_stdin(args, None)
    }

    pub fn run_stdin(&self, args: &[&str], stdin: Option<&str>) -> Run {
        let mut c = self.cmd();
        c.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        let mut pipe = child.stdin.take().unwrap();
        if let Some(input) = stdin {
            pipe.write_all(input.as_bytes()).unwrap();
        }
        drop(pipe);
        let out = child.wait_with_output().unwrap();
        Run {
            args: args.iter().map(|s| s.to_string()).collect(),
            out,
        }
    }

    /// keygen + mint with the given flags.
    pub fn minted(&self, flags: &[&str]) -> String {
        self.run(&["keygen"]).ok();
        let mut args = vec!["mint"];
        args.extend_from_slice(flags);
        self.run(&args).ok()
    }
}

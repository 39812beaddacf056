//! A real `redis-server` on a free loopback port, started and stopped by the test.
//!
//! Without `redis-server` on the PATH, [`RedisServer::start`] returns `None` and says so
//! on the terminal (past the test harness's output capture), unless `CI=true`: then a
//! missing server fails the test instead of skipping it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server for `test`, or `None` (with a loud note) where none is installed.
    pub fn start(test: &str) -> Option<RedisServer> {
        if Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            let how = "install it with `apt-get install -y redis-server` (Debian/Ubuntu) or \
                       `brew install redis` (macOS)";
            if std::env::var("CI").is_ok_and(|ci| ci == "true") {
                panic!("{test} needs redis-server, which is not on the PATH; {how}");
            }
            // Straight to the terminal: the harness captures eprintln! of passing tests.
            let _ = writeln!(
                std::io::stderr(),
                "\n*** SKIPPED {test}: redis-server is not on the PATH; {how}. ***\n"
            );
            return None;
        }
        let port = free_port();
        let mut server = RedisServer { port, child: None };
        server.spawn();
        Some(server)
    }

    /// `redis://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL: no chance to save or say goodbye).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Sends one command (inline syntax) and returns the first line of the reply.
    pub fn command(&self, line: &str) -> String {
        Self::command_on(self.port, line)
    }

    /// Keys left besides idle tenants' lease hashes: a tenant's hash outlives its last lease
    /// (holding no lease and `=sum` 0) until it expires, and anything else should be gone
    /// once everything ends.
    pub fn leftover_keys(&self) -> u64 {
        let script = "local n = 0 \
            for _, key in ipairs(redis.call('KEYS', '*')) do \
              local idle = string.sub(key, -7) == ':tokens' \
                and redis.call('TYPE', key).ok == 'hash' \
                and redis.call('HLEN', key) == 3 \
                and redis.call('HGET', key, '=sum') == '0' \
              if not idle then n = n + 1 end \
            end \
            return n";
        let reply = self.command(&format!("EVAL \"{script}\" 0"));
        reply
            .strip_prefix(':')
            .and_then(|count| count.parse().ok())
            .unwrap_or_else(|| panic!("counting keys: {reply}"))
    }

    /// [`command`](Self::command) to the server on `port`, from any thread.
    pub fn command_on(port: u16, line: &str) -> String {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to redis");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        stream
            .write_all(format!("{line}\r\n").as_bytes())
            .expect("write to redis");
        let mut reply = String::new();
        BufReader::new(stream)
            .read_line(&mut reply)
            .expect("read from redis");
        reply.trim_end().to_owned()
    }

    fn spawn(&mut self) {
        let port = self.port.to_string();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
            ])
            .args([
                "no",
                "--enable-debug-command",
                "yes",
                "--loglevel",
                "warning",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) {
                let mut reply = [0u8; 7];
                if stream.write_all(b"PING\r\n").is_ok()
                    && stream.read_exact(&mut reply).is_ok()
                    && &reply == b"+PONG\r\n"
                {
                    return;
                }
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                let mut stderr = String::new();
                if let Some(mut pipe) = self.child.as_mut().and_then(|c| c.stderr.take()) {
                    let _ = pipe.read_to_string(&mut stderr);
                }
                panic!("redis-server exited with {status}: {stderr}");
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer PING"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("local addr").port()
}

//! Talking to servers: RESP over TCP, `redis-cli`, and bounded waits.
#![allow(dead_code)]

use super::*;

/// A reply in RESP2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<String>),
    Array(Option<Vec<Resp>>),
}

impl Resp {
    /// The text of a simple or bulk string.
    pub fn text(&self) -> Option<&str> {
        match self {
            Resp::Simple(s) | Resp::Bulk(Some(s)) => Some(s),
            _ => None,
        }
    }

    pub fn int(&self) -> Option<i64> {
        match self {
            Resp::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The items of an array (none for anything else).
    pub fn items(&self) -> &[Resp] {
        match self {
            Resp::Array(Some(items)) => items,
            _ => &[],
        }
    }

    /// A flat `[key, value, key, value, …]` array (as Sentinel answers) as pairs.
    pub fn pairs(&self) -> Vec<(String, String)> {
        self.items()
            .chunks(2)
            .filter_map(|kv| match kv {
                [k, v] => Some((
                    k.text()?.to_owned(),
                    v.text().unwrap_or_default().to_owned(),
                )),
                _ => None,
            })
            .collect()
    }

    /// The value of `key` in a flat `[key, value, …]` array.
    pub fn get(&self, key: &str) -> Option<String> {
        self.pairs()
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }
}

/// Parses one reply from the front of `buf`: `None` while it is incomplete, else the reply and the
/// bytes it took.
pub(crate) fn parse_resp(buf: &[u8]) -> Result<Option<(Resp, usize)>, String> {
    let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let line = std::str::from_utf8(&buf[1..eol]).map_err(|e| e.to_string())?;
    let after = eol + 2;
    let number = || {
        line.parse::<i64>()
            .map_err(|e| format!("bad RESP number {line:?}: {e}"))
    };
    Ok(Some(match buf[0] {
        b'+' => (Resp::Simple(line.to_owned()), after),
        b'-' => (Resp::Error(line.to_owned()), after),
        b':' => (Resp::Int(number()?), after),
        b'$' => {
            let Ok(len) = usize::try_from(number()?) else {
                return Ok(Some((Resp::Bulk(None), after)));
            };
            if buf.len() < after + len + 2 {
                return Ok(None);
            }
            let text = String::from_utf8_lossy(&buf[after..after + len]).into_owned();
            (Resp::Bulk(Some(text)), after + len + 2)
        }
        b'*' => {
            let Ok(len) = usize::try_from(number()?) else {
                return Ok(Some((Resp::Array(None), after)));
            };
            let mut items = Vec::with_capacity(len);
            let mut at = after;
            for _ in 0..len {
                let Some((item, used)) = parse_resp(&buf[at..])? else {
                    return Ok(None);
                };
                items.push(item);
                at += used;
            }
            (Resp::Array(Some(items)), at)
        }
        other => return Err(format!("unexpected RESP type byte {:?}", other as char)),
    }))
}

/// Sends `commands` to `127.0.0.1:port` over one connection, in order, and returns their replies
/// (error replies included). `Err` when the server cannot be reached or does not answer all within
/// 2 s — as a stopped (SIGSTOP) server never does.
pub async fn pipeline(port: u16, commands: &[&[&str]]) -> Result<Vec<Resp>, String> {
    let exchange = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("connect to port {port}: {e}"))?;
        let mut request = Vec::new();
        for args in commands {
            request.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
            for arg in *args {
                request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
                request.extend_from_slice(arg.as_bytes());
                request.extend_from_slice(b"\r\n");
            }
        }
        stream
            .write_all(&request)
            .await
            .map_err(|e| format!("write to port {port}: {e}"))?;
        let mut buf = Vec::new();
        let mut replies = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        while replies.len() < commands.len() {
            while let Some((reply, used)) = parse_resp(&buf)? {
                replies.push(reply);
                buf.drain(..used);
                if replies.len() == commands.len() {
                    return Ok(replies);
                }
            }
            let n = stream
                .read(&mut chunk)
                .await
                .map_err(|e| format!("read from port {port}: {e}"))?;
            if n == 0 {
                return Err(format!("port {port} closed the connection"));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok(replies)
    };
    timeout(COMMAND_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("port {port} did not answer within {COMMAND_TIMEOUT:?}"))?
}

/// Sends one command to `127.0.0.1:port`; an error reply is an `Err` too.
pub async fn command(port: u16, args: &[&str]) -> Result<Resp, String> {
    match pipeline(port, &[args]).await?.pop() {
        Some(Resp::Error(e)) => Err(format!("{args:?} on port {port}: {e}")),
        Some(reply) => Ok(reply),
        None => Err("no reply".into()),
    }
}

/// `INFO section` of the server on `port`, as `field:value` text.
pub(crate) async fn info(port: u16, section: &str) -> Result<String, String> {
    command(port, &["INFO", section])
        .await?
        .text()
        .map(str::to_owned)
        .ok_or_else(|| format!("INFO {section} on port {port}: not text"))
}

/// The value of `name` in `field:value` lines (INFO, CLUSTER INFO).
pub(crate) fn field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines()
        .filter_map(|line| line.trim_end().split_once(':'))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// Runs `redis-cli` with `args` (at most 10 s, or it panics) and returns what it did. Mind that
/// `redis-cli` exits 0 even when the server answers an error: look at its stdout.
pub async fn redis_cli(args: &[&str]) -> Output {
    redis_cli_within(args, CLI_TIMEOUT).await
}

pub(crate) async fn redis_cli_within(args: &[&str], limit: Duration) -> Output {
    let run = tokio::process::Command::new("redis-cli")
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    match timeout(limit, run).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => panic!("redis-cli could not run (is it installed?): {e}"),
        Err(_) => panic!("redis-cli {args:?} did not finish within {limit:?}"),
    }
}

/// `redis-cli`'s stdout, trimmed.
pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Both of `redis-cli`'s outputs, for messages.
pub(crate) fn outputs(output: &Output) -> String {
    format!(
        "status {}, stdout {:?}, stderr {:?}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Checks `check` every 100 ms until it returns `Ok`, for at most [`WAIT`]; then panics with
/// `what`, the last reason it gave and `logs()`.
pub(crate) async fn wait_until<T, Fut>(
    what: &str,
    logs: impl Fn() -> String,
    check: impl FnMut() -> Fut,
) -> T
where
    Fut: Future<Output = Result<T, String>>,
{
    wait_until_within(WAIT, what, logs, check).await
}

/// As [`wait_until`], for at most `limit`.
pub(crate) async fn wait_until_within<T, Fut>(
    limit: Duration,
    what: &str,
    logs: impl Fn() -> String,
    mut check: impl FnMut() -> Fut,
) -> T
where
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + limit;
    loop {
        let last = match check().await {
            Ok(value) => return value,
            Err(reason) => reason,
        };
        if Instant::now() >= deadline {
            panic!("{what}: not so within {limit:?}; last: {last}\n{}", logs());
        }
        sleep(POLL).await;
    }
}

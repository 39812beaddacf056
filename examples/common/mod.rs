//! Start-up shared by the smaller examples: the `--addr` flag, logging, binding.
#![allow(dead_code)] // each example uses what it needs

use std::net::SocketAddr;

/// Reads `[--addr ADDR]` (default 127.0.0.1:`port`), starts logging (`RUST_LOG`, default
/// `info`), and returns the address. `--help` prints `usage`; bad arguments print it and exit 2.
pub fn start(port: u16, usage: &str) -> SocketAddr {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let addr = match args.as_slice() {
        [] => Ok(SocketAddr::from(([127, 0, 0, 1], port))),
        [flag] if flag == "-h" || flag == "--help" => {
            println!("{usage}");
            std::process::exit(0);
        }
        [flag, addr] if flag == "--addr" => addr
            .parse::<SocketAddr>()
            .map_err(|error| format!("invalid --addr `{addr}`: {error}")),
        _ => Err(format!("unexpected arguments {args:?}")),
    };
    let addr = addr.unwrap_or_else(|error| {
        eprintln!("error: {error}\n{usage}");
        std::process::exit(2);
    });
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    addr
}

/// Binds `addr`, or exits with a clear message.
pub async fn bind(addr: SocketAddr) -> tokio::net::TcpListener {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .unwrap_or_else(|error| {
            eprintln!("error: cannot listen on {addr}: {error}");
            std::process::exit(1);
        });
    println!("listening on http://{addr}");
    listener
}

/// Serves an axum app on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, app: axum::Router) {
    if let Err(error) = axum::serve(bind(addr).await, app).await {
        eprintln!("error: {error}");
        std::process::exit(1);
    }
}

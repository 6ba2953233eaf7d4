//! The in-process guard in front of a hyper gRPC-style client, with a loopback server: audit,
//! then enforce by replacing the snapshot file while the client runs (hot reload).
//!
//! ```text
//! cargo run --example guard_demo -- server 127.0.0.1:50051
//! cargo run --example guard_demo -- client guard.snap prod 127.0.0.1:50051 [ROUNDS]
//! ```
//!
//! The client is the policy's `checkout` service (policy-examples/rpc-guard.toml). Every
//! second it calls `/billing.Billing/Charge` (allowed) and `/billing.Billing/Refund` (not
//! allowed) on the server, prints what happened and the `depfence_rpc_calls_total` counters,
//! and watches the snapshot file. See README "In-process guard".

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use depfence::guard::{CallError, Guard, GuardLayer, describe_metrics};
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tower::{Layer, Service};

const USAGE: &str = "usage: guard_demo server ADDR | guard_demo client SNAPSHOT ENVIRONMENT ADDR [ROUNDS]";

fn main() -> ExitCode {
    let colour = std::io::IsTerminal::is_terminal(&std::io::stdout());
    tracing_subscriber::fmt()
        .without_time()
        .with_target(false)
        .with_ansi(colour)
        .with_env_filter("depfence=info")
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("guard_demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["server", addr] => runtime.block_on(server(addr)),
        ["client", snapshot, environment, addr] => runtime.block_on(client(snapshot, environment, addr, u32::MAX)),
        ["client", snapshot, environment, addr, rounds] => match rounds.parse() {
            Ok(rounds) => runtime.block_on(client(snapshot, environment, addr, rounds)),
            Err(_) => Err(USAGE.to_owned()),
        },
        _ => Err(USAGE.to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("guard_demo: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Answers every request as a successful unary gRPC call (HTTP/2 or HTTP/1).
async fn server(addr: &str) -> Result<(), String> {
    let addr: SocketAddr = addr.parse().map_err(|e| format!("`{addr}`: {e}"))?;
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("bind {addr}: {e}"))?;
    // The bound address: port 0 asks for a free one, and the caller reads which.
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    println!("server: listening on {bound}");
    loop {
        let (stream, _) = listener.accept().await.map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|request: Request<hyper::body::Incoming>| async move {
                println!("server: {} {}", request.method(), request.uri().path());
                Response::builder()
                    .header("content-type", "application/grpc")
                    .header("grpc-status", "0")
                    .body(Full::new(Bytes::new()))
                    .map_err(|e| -> Infallible { unreachable_error(e) })
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder.serve_connection(TokioIo::new(stream), service).await {
                eprintln!("server: connection: {e}");
            }
        });
    }
}

/// The response above is built from constants; building it cannot fail.
fn unreachable_error(e: http::Error) -> Infallible {
    eprintln!("server: {e}");
    std::process::exit(1)
}

async fn client(snapshot: &str, environment: &str, addr: &str, rounds: u32) -> Result<(), String> {
    let metrics =
        metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder().map_err(|e| e.to_string())?;
    describe_metrics();
    let guard = Guard::from_file(snapshot, environment).map_err(|e| e.to_string())?;
    let _watch = guard.watch(Duration::from_millis(500)).map_err(|e| e.to_string())?;
    println!("client: checkout, environment {environment}, snapshot {}", guard.snapshot_hash());
    let http = Client::builder(TokioExecutor::new()).http2_only(true).build_http::<Full<Bytes>>();
    let mut client = GuardLayer::new(guard, "checkout").map_err(|e| e.to_string())?.layer(http);
    for round in 1..=rounds {
        for method in ["Charge", "Refund"] {
            let rpc = format!("/billing.Billing/{method}");
            let request = Request::post(format!("http://{addr}{rpc}"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(Full::new(Bytes::new()))
                .map_err(|e| e.to_string())?;
            std::future::poll_fn(|cx| client.poll_ready(cx)).await.map_err(|e| e.to_string())?;
            match client.call(request).await {
                Ok(response) => {
                    let header = |name: &str| {
                        response.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned()
                    };
                    let message =
                        percent_encoding::percent_decode_str(&header("grpc-message")).decode_utf8_lossy().into_owned();
                    if message.is_empty() {
                        println!("client: round {round} {rpc:<26} grpc-status {}", header("grpc-status"));
                    } else {
                        println!("client: round {round} {rpc:<26} grpc-status {} ({message})", header("grpc-status"));
                    }
                }
                Err(CallError::Denied(denied)) => println!("client: round {round} {rpc:<26} denied: {denied}"),
                Err(CallError::Inner(e)) => println!("client: round {round} {rpc:<26} transport error: {e}"),
            }
        }
        for line in metrics.render().lines().filter(|l| l.starts_with("depfence_rpc_calls_total")) {
            println!("client:   {line}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(())
}

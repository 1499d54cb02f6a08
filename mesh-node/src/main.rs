//! `mesh-node`: a provider peer, and the commands to run it.
//!
//! ```text
//! mesh-node init --bootstrap /ip4/1.2.3.4/tcp/31337/p2p/12D3KooW...   # ~/.mesh/node.toml + key
//! mesh-node register                # check files, memory, mesh, reachability; save the span
//! mesh-node start --daemon          # or in the foreground, flags overriding the file
//! mesh-node status                  # from the node's http://127.0.0.1:9090/healthz
//! mesh-node stop
//! mesh-node probe --json
//! mesh-node earnings                # from the node's ledger (asked of the node while it runs)
//! ```
//! `start` prints `http on <addr>`, `peer id <id>`, `listening on <addr>/p2p/<id>` per
//! address, `serving <model> blocks [a, b) of n`, then `server up|down <peer> <model> ...` as
//! other servers of the model come and go.

mod cli;
mod logging;
mod ops;
mod register;
mod start;
mod summary;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let result = match cli.command {
        cli::Command::Init(a) => ops::init(a).map(|()| 0),
        cli::Command::Register(a) => register::register(*a).map(|()| 0),
        cli::Command::Start(a) => start::start(*a).map(|()| 0),
        cli::Command::Stop(a) => ops::stop(a).map(|()| 0),
        cli::Command::Status(a) => ops::status(a),
        cli::Command::Probe(a) => ops::probe(a).map(|()| 0),
        cli::Command::Earnings(a) => ops::earnings(a).map(|()| 0),
        cli::Command::Settle(a) => ops::settle(a).map(|()| 0),
    };
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            // One line with the whole chain of causes: `error: config ...: unknown field`.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

//! The `persona-gate` binary: parse flags, set up logging, dispatch, print errors on one line.

mod cli;

use std::process::ExitCode;

use clap::{CommandFactory, Parser};

use cli::Cli;

/// Checks the CPU before any other code of the binary runs, including llama.cpp's C++ static
/// constructors (prioritised `.init_array` entries run before unprioritised ones).
#[cfg(target_os = "linux")]
#[used]
#[link_section = ".init_array.00101"]
static CPU_CHECK: extern "C" fn() = {
    extern "C" fn check() {
        persona_gate::cpu::check_or_exit();
    }
    check
};

fn main() -> ExitCode {
    #[cfg(not(target_os = "linux"))]
    persona_gate::cpu::check_or_exit();
    // Flag errors are one line too (clap's own usage text is multi-line); help and version
    // print as usual. llama.cpp's multi-letter short flags (-ngl, -np, ...) become long names
    // first (cli::argv).
    let args = cli::argv::rewrite(std::env::args_os(), &Cli::command());
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            eprintln!("persona-gate: {} (see --help)", cli::one_line_error(&e));
            return ExitCode::from(2);
        }
    };
    let default = match cli.verbose {
        0 => "warn",
        1 => "persona_gate=debug,warn",
        _ => "debug,llama.cpp=trace",
    };
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into());
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    // Plain warnings by default; timestamps only when debugging.
    if cli.verbose == 0 {
        fmt.without_time().init();
    } else {
        fmt.init();
    }
    match cli::dispatch(&cli.command, &mut std::io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        // A reader that went away (`| head`) is not an error of ours.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            let msg: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("persona-gate: {}", msg.join(": ").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

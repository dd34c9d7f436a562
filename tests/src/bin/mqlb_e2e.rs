//! The `mqlb` entry point, for process-level tests (see Cargo.toml).

fn main() -> std::process::ExitCode {
    mqlb_balancer::cli::main()
}

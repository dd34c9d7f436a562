//! The `mqlb` binary: a thin shell over [`mqlb_balancer::cli`].

fn main() -> std::process::ExitCode {
    mqlb_balancer::cli::main()
}

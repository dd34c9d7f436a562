//! The `mqlb` binary: a thin shell over [`mqlb::cli`].

fn main() -> std::process::ExitCode {
    mqlb::cli::main()
}

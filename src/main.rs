//! `tde-broker`: a checklist — logging, crypto provider, arguments, run.
fn main() -> std::process::ExitCode {
    tde_broker::telemetry::init();
    tde_broker::cli::main()
}

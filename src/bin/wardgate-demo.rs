//! `cargo run --release -- demo`: the all-in-one demo (see `wardgate::demo`).

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) != Some("demo") {
        eprintln!("usage: cargo run --release -- demo");
        return std::process::ExitCode::from(2);
    }
    if let Err(e) = wardgate::build::build_siblings() {
        eprintln!("error: {e:#}");
        return std::process::ExitCode::FAILURE;
    }
    match wardgate::demo::run_demo() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

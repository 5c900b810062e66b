fn main() {
    std::process::exit(diskit::cli::main());
}

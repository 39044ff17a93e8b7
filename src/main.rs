//! The `fleetsql` binary: everything lives in the library; see `cli`.

fn main() {
    std::process::exit(fleetsql::cli::main());
}

//! The `drclone` binary: see [`cli`].

mod cli;

fn main() {
    cli::commands::main()
}

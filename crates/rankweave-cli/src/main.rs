//! The `rankweave` command.
fn main() {
    println!("rankweave");
}

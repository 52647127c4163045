//! One module per subcommand.

pub mod gen_model;
pub mod generate;
pub mod logits;

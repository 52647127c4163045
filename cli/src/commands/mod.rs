//! One module per subcommand.

pub mod bench;
pub mod cluster_cmd;
pub mod coordinator;
pub mod delay_proxy;
pub mod expert_node;
pub mod gen_model;
pub mod generate;
pub mod logits;
pub mod serve;
pub mod simulate;
pub mod up;

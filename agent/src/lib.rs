//! The Sluice node agent, its CNI plugin and its operator CLI share this library.

pub mod cni;
pub mod config;
pub mod datapath;
pub mod endpoints;
pub mod external_ip;
pub mod follower;
pub mod health;
pub mod ipam;
pub mod k8s;
pub mod masquerade;
pub mod metrics;
pub mod model;
pub mod net;
pub mod service_health;

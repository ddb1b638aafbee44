//! Training data: the procedural shapes dataset and image folders with captions.

pub mod folder;
pub mod shapes;

//! Training data: the procedural shapes dataset and image folders with captions.

pub mod shapes;

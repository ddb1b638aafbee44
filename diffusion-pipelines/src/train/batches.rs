//! Resumable streams of captioned training images: the procedural shapes dataset or an
//! image folder, with their position saved in checkpoints ([`DataState`]) so a resumed run
//! sees exactly the examples an uninterrupted one would.

use diffusion_core::{Error, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::folder::ImageFolder;
use crate::data::shapes::ShapesDataset;
use crate::image_io::RgbImage;
use crate::train::rng::{RngState, capture_chacha8, restore_chacha8};

/// Where a [`TrainingData`] stream is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataState {
    /// The shapes dataset's generator.
    Shapes {
        /// Generator state.
        rng: RngState,
    },
    /// An image folder: the epoch, the position in its shuffled order and the flip
    /// generator.
    Folder {
        /// Epoch number (0-based).
        epoch: u64,
        /// Examples of this epoch already used.
        position: usize,
        /// The flip generator.
        rng: RngState,
    },
}

/// A captioned image stream.
#[derive(Debug, Clone)]
pub enum TrainingData {
    /// The endless procedural shapes dataset.
    Shapes(ShapesDataset),
    /// An image folder, shuffled per epoch.
    Folder {
        /// The folder.
        folder: ImageFolder,
        /// Seed of the epoch shuffles.
        seed: u64,
        /// Current epoch.
        epoch: u64,
        /// Position in the current epoch's order.
        position: usize,
        /// The current epoch's order.
        order: Vec<usize>,
        /// Flip generator.
        rng: ChaCha8Rng,
    },
}

impl TrainingData {
    /// The shapes dataset at `side` x `side` pixels.
    pub fn shapes(side: u32, seed: u64) -> Self {
        Self::Shapes(ShapesDataset::new(side, seed))
    }

    /// An image folder (see [`ImageFolder::open`]), shuffled per epoch with `seed`.
    pub fn folder(folder: ImageFolder, seed: u64) -> Self {
        let order = folder.epoch_order(seed, 0);
        Self::Folder {
            folder,
            seed,
            epoch: 0,
            position: 0,
            order,
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0xF11B),
        }
    }

    /// The next `n` examples.
    pub fn next_batch(&mut self, n: usize) -> Result<Vec<(RgbImage, String)>> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.next_example()?);
        }
        Ok(out)
    }

    /// The next example.
    pub fn next_example(&mut self) -> Result<(RgbImage, String)> {
        match self {
            Self::Shapes(d) => {
                let (_, image, caption) = d.next_example();
                Ok((image, caption))
            }
            Self::Folder {
                folder,
                seed,
                epoch,
                position,
                order,
                rng,
            } => {
                if *position >= order.len() {
                    *epoch += 1;
                    *position = 0;
                    *order = folder.epoch_order(*seed, *epoch);
                }
                let index = order[*position];
                *position += 1;
                folder.load(index, rng)
            }
        }
    }

    /// The stream's position.
    pub fn state(&self) -> DataState {
        match self {
            Self::Shapes(d) => DataState::Shapes {
                rng: capture_chacha8(d.rng()),
            },
            Self::Folder {
                epoch,
                position,
                rng,
                ..
            } => DataState::Folder {
                epoch: *epoch,
                position: *position,
                rng: capture_chacha8(rng),
            },
        }
    }

    /// Moves the stream to a saved position (of a stream of the same kind).
    pub fn restore(&mut self, state: &DataState) -> Result<()> {
        match (self, state) {
            (Self::Shapes(d), DataState::Shapes { rng }) => {
                *d.rng_mut() = restore_chacha8(rng)?;
                Ok(())
            }
            (
                Self::Folder {
                    folder,
                    seed,
                    epoch,
                    position,
                    order,
                    rng,
                },
                DataState::Folder {
                    epoch: e,
                    position: p,
                    rng: r,
                },
            ) => {
                if *p > folder.len() {
                    return Err(Error::InvalidArgument(format!(
                        "saved data position {p} is beyond the folder's {} images",
                        folder.len()
                    )));
                }
                *epoch = *e;
                *position = *p;
                *order = folder.epoch_order(*seed, *e);
                *rng = restore_chacha8(r)?;
                Ok(())
            }
            _ => Err(Error::InvalidArgument(
                "the saved data position is for another kind of dataset".into(),
            )),
        }
    }
}

/// Images as one `[n, 3, H, W]` float array in `[-1, 1]` (row-major), the VAE's input range.
pub fn images_to_signed_chw(images: &[&RgbImage]) -> Result<(Vec<f32>, [usize; 4])> {
    let first = images
        .first()
        .ok_or_else(|| Error::InvalidArgument("no images".into()))?;
    let (w, h) = (first.width as usize, first.height as usize);
    let mut data = Vec::with_capacity(images.len() * 3 * h * w);
    for img in images {
        if (img.width as usize, img.height as usize) != (w, h) {
            return Err(Error::Shape(format!(
                "images of different sizes in one batch ({}x{} and {w}x{h})",
                img.width, img.height
            )));
        }
        data.extend(img.to_chw_unit().into_iter().map(|v| v * 2.0 - 1.0));
    }
    Ok((data, [images.len(), 3, h, w]))
}

/// Tiles images (all the same size) into a grid with `columns` columns and a 2-pixel gap.
pub fn image_grid(images: &[RgbImage], columns: usize) -> Result<RgbImage> {
    let first = images
        .first()
        .ok_or_else(|| Error::InvalidArgument("no images for the grid".into()))?;
    let (w, h) = (first.width as usize, first.height as usize);
    if images
        .iter()
        .any(|i| (i.width as usize, i.height as usize) != (w, h))
    {
        return Err(Error::Shape("grid images differ in size".into()));
    }
    let columns = columns.clamp(1, images.len());
    let rows = images.len().div_ceil(columns);
    let gap = 2;
    let (gw, gh) = (
        columns * w + (columns - 1) * gap,
        rows * h + (rows - 1) * gap,
    );
    let mut pixels = vec![255u8; gw * gh * 3];
    for (i, img) in images.iter().enumerate() {
        let (x0, y0) = ((i % columns) * (w + gap), (i / columns) * (h + gap));
        for y in 0..h {
            let src = &img.pixels[y * w * 3..(y + 1) * w * 3];
            let dst = ((y0 + y) * gw + x0) * 3;
            pixels[dst..dst + w * 3].copy_from_slice(src);
        }
    }
    Ok(RgbImage {
        width: gw as u32,
        height: gh as u32,
        pixels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_stream_resumes_exactly() {
        let mut a = TrainingData::shapes(16, 3);
        a.next_batch(5).unwrap();
        let state = a.state();
        let json = serde_json::to_string(&state).unwrap();
        let expected = a.next_batch(4).unwrap();
        let mut b = TrainingData::shapes(16, 3);
        b.restore(&serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!(b.next_batch(4).unwrap(), expected);
    }

    #[test]
    fn folder_stream_crosses_epochs_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..3 {
            let img =
                image::RgbImage::from_fn(8, 8, |x, _| image::Rgb([(x * 30) as u8, i * 60, 0]));
            img.save(dir.path().join(format!("{i}.png"))).unwrap();
            std::fs::write(dir.path().join(format!("{i}.txt")), format!("image {i}")).unwrap();
        }
        let folder = ImageFolder::open(dir.path(), 8, true).unwrap();
        let mut a = TrainingData::folder(folder.clone(), 1);
        let first: Vec<String> = a.next_batch(3).unwrap().into_iter().map(|x| x.1).collect();
        let mut sorted = first.clone();
        sorted.sort();
        assert_eq!(sorted, vec!["image 0", "image 1", "image 2"]);
        a.next_batch(1).unwrap();
        let state = a.state();
        let expected = a.next_batch(4).unwrap();
        let mut b = TrainingData::folder(folder, 1);
        b.restore(&state).unwrap();
        assert_eq!(b.next_batch(4).unwrap(), expected);
        assert!(b.restore(&TrainingData::shapes(8, 0).state()).is_err());
    }

    #[test]
    fn grids_and_signed_arrays() {
        let img = RgbImage {
            width: 2,
            height: 1,
            pixels: vec![0, 0, 0, 255, 255, 255],
        };
        let (data, shape) = images_to_signed_chw(&[&img, &img]).unwrap();
        assert_eq!(shape, [2, 3, 1, 2]);
        assert_eq!(&data[..2], &[-1.0, 1.0]);
        let grid = image_grid(&[img.clone(), img.clone(), img], 2).unwrap();
        assert_eq!((grid.width, grid.height), (6, 4));
    }
}

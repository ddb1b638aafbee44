//! A captioned image folder, as diffusers' training scripts read one: every image
//! (`.png`, `.jpg`, `.jpeg`, `.webp`, `.bmp`) with its caption either in a same-name `.txt`
//! file or in `metadata.jsonl` (one `{"file_name": ..., "text": ...}` object per line).
//! Images are resized so the shorter side is the target size, center-cropped and optionally
//! flipped; epochs are shuffled with a seeded generator.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use diffusion_core::{Error, Result};
use image::imageops::FilterType;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::image_io::RgbImage;

const IMAGE_EXTENSIONS: [&str; 5] = ["png", "jpg", "jpeg", "webp", "bmp"];

/// One example of an [`ImageFolder`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FolderItem {
    /// The image file.
    pub path: PathBuf,
    /// Its caption.
    pub caption: String,
}

/// A captioned image folder.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    items: Vec<FolderItem>,
    size: u32,
    flip: bool,
}

impl ImageFolder {
    /// Indexes `dir`. Images without a caption are an error naming the first such file.
    pub fn open(dir: impl AsRef<Path>, size: u32, flip: bool) -> Result<Self> {
        let dir = dir.as_ref();
        if size == 0 {
            return Err(Error::InvalidArgument("image size must be positive".into()));
        }
        let mut metadata = HashMap::new();
        let meta_path = dir.join("metadata.jsonl");
        if meta_path.exists() {
            let text = std::fs::read_to_string(&meta_path).map_err(|e| Error::io(&meta_path, e))?;
            for (i, line) in text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
            {
                let v: serde_json::Value = serde_json::from_str(line).map_err(|e| Error::Json {
                    context: format!("{}:{}", meta_path.display(), i + 1),
                    message: e.to_string(),
                })?;
                let file = v.get("file_name").and_then(|f| f.as_str());
                let caption = v.get("text").and_then(|f| f.as_str());
                match (file, caption) {
                    (Some(f), Some(c)) => {
                        metadata.insert(f.to_string(), c.to_string());
                    }
                    _ => {
                        return Err(Error::Json {
                            context: format!("{}:{}", meta_path.display(), i + 1),
                            message: "expected string fields \"file_name\" and \"text\"".into(),
                        });
                    }
                }
            }
        }
        let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
            })
            .collect();
        paths.sort();
        let mut items = Vec::with_capacity(paths.len());
        for path in paths {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            let caption = if let Some(c) = metadata.get(&name) {
                c.clone()
            } else {
                let txt = path.with_extension("txt");
                match std::fs::read_to_string(&txt) {
                    Ok(c) => c.trim().to_string(),
                    Err(_) => {
                        return Err(Error::InvalidArgument(format!(
                            "{}: no caption (no {} and no entry in metadata.jsonl)",
                            path.display(),
                            txt.display()
                        )));
                    }
                }
            };
            items.push(FolderItem { path, caption });
        }
        if items.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "{}: no images found",
                dir.display()
            )));
        }
        Ok(Self { items, size, flip })
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the folder holds no examples (never true for an opened folder).
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The indexed examples, sorted by file name.
    pub fn items(&self) -> &[FolderItem] {
        &self.items
    }

    /// The order of examples in `epoch` for `seed` (a seeded shuffle).
    pub fn epoch_order(&self, seed: u64, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.items.len()).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        order.shuffle(&mut rng);
        order
    }

    /// Loads example `index`: resized (shorter side = size), center-cropped to size x size,
    /// flipped horizontally with probability 1/2 when flipping is on.
    pub fn load(&self, index: usize, rng: &mut impl Rng) -> Result<(RgbImage, String)> {
        let item = self
            .items
            .get(index)
            .ok_or_else(|| Error::InvalidArgument(format!("example {index} out of range")))?;
        let img = image::open(&item.path)
            .map_err(|e| Error::InvalidArgument(format!("{}: {e}", item.path.display())))?
            .to_rgb8();
        let (w, h) = img.dimensions();
        let scale = self.size as f64 / w.min(h) as f64;
        let (nw, nh) = (
            ((w as f64 * scale).round() as u32).max(self.size),
            ((h as f64 * scale).round() as u32).max(self.size),
        );
        let resized = image::imageops::resize(&img, nw, nh, FilterType::Triangle);
        let (x, y) = ((nw - self.size) / 2, (nh - self.size) / 2);
        let mut cropped =
            image::imageops::crop_imm(&resized, x, y, self.size, self.size).to_image();
        if self.flip && rng.random_bool(0.5) {
            image::imageops::flip_horizontal_in_place(&mut cropped);
        }
        Ok((
            RgbImage {
                width: self.size,
                height: self.size,
                pixels: cropped.into_raw(),
            },
            item.caption.clone(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_png(path: &Path, w: u32, h: u32) {
        let img =
            image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 10) as u8, (y * 10) as u8, 0]));
        img.save(path).unwrap();
    }

    #[test]
    fn reads_txt_and_metadata_captions() {
        let dir = tempfile::tempdir().unwrap();
        write_png(&dir.path().join("a.png"), 20, 10);
        std::fs::write(dir.path().join("a.txt"), "a wide image\n").unwrap();
        write_png(&dir.path().join("b.png"), 10, 30);
        std::fs::write(
            dir.path().join("metadata.jsonl"),
            "{\"file_name\": \"b.png\", \"text\": \"a tall image\"}\n",
        )
        .unwrap();
        let folder = ImageFolder::open(dir.path(), 8, true).unwrap();
        assert_eq!(folder.len(), 2);
        assert_eq!(folder.items()[0].caption, "a wide image");
        assert_eq!(folder.items()[1].caption, "a tall image");
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let (img, _) = folder.load(1, &mut rng).unwrap();
        assert_eq!((img.width, img.height, img.pixels.len()), (8, 8, 8 * 8 * 3));
        let order = folder.epoch_order(5, 0);
        assert_eq!(order, folder.epoch_order(5, 0));
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1]);
    }

    #[test]
    fn missing_captions_and_empty_folders_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        assert!(ImageFolder::open(dir.path(), 8, false).is_err());
        write_png(&dir.path().join("c.png"), 4, 4);
        let err = ImageFolder::open(dir.path(), 8, false).unwrap_err();
        assert!(err.to_string().contains("no caption"), "{err}");
        std::fs::write(dir.path().join("metadata.jsonl"), "{not json}\n").unwrap();
        assert!(matches!(
            ImageFolder::open(dir.path(), 8, false),
            Err(Error::Json { .. })
        ));
    }
}

//! `--events FILE`: one JSON object per event, one per line, flushed as written so
//! that `tail -f` shows each decision as it happens.

use std::{
    fs::File,
    io::{self, BufWriter, Write as _},
    path::Path,
};

use crate::event::Record;

#[derive(Debug)]
pub struct JsonLines {
    out: BufWriter<File>,
}

impl JsonLines {
    pub fn create(path: &Path) -> io::Result<Self> {
        Ok(Self {
            out: BufWriter::new(File::create(path)?),
        })
    }

    pub fn write(&mut self, record: &Record) -> io::Result<()> {
        serde_json::to_writer(&mut self.out, record)?;
        self.out.write_all(b"\n")?;
        self.out.flush()
    }
}

//! numpy `.npy` files (`np.save`), through the `npyz` crate: float32, float64 or float16,
//! either byte order, C or Fortran order.

use super::import::{Foreign, Tensor, MAX_VALUES};
use crate::error::{At, Error, ImportProblem, Result};

/// Reads the one array of a `.npy` file as a tensor named `name`.
///
/// # Errors
/// Not a `.npy` header ([`Error::Record`]); a dtype that is not a float, too many values, or
/// data shorter than the header says ([`Error::Import`], [`Error::Record`]).
pub(crate) fn read(bytes: &[u8], name: &str) -> Result<Foreign> {
    let bad = |why: String| Error::record(At::Whole, why);
    let npy = npyz::NpyFile::new(bytes).map_err(|e| bad(format!("not a .npy file: {e}")))?;
    let shape: Vec<u64> = npy.shape().to_vec();
    let values: u128 = shape.iter().map(|&s| u128::from(s)).product();
    let dtype = npy.dtype();
    let descr = match &dtype {
        npyz::DType::Plain(ts) => ts.to_string(),
        other => other.descr(),
    };
    let npyz::DType::Plain(ts) = &dtype else {
        return Err(Error::Import(ImportProblem::NotFloat {
            tensor: name.to_string(),
            dtype: descr,
        }));
    };
    let size = ts.size_field();
    if ts.type_char() != npyz::TypeChar::Float || !matches!(size, 2 | 4 | 8) {
        return Err(Error::Import(ImportProblem::NotFloat {
            tensor: name.to_string(),
            dtype: descr,
        }));
    }
    if values > MAX_VALUES {
        return Err(Error::Import(ImportProblem::TooLarge {
            tensor: name.to_string(),
            values,
        }));
    }
    // Checked before reading, so a header claiming more than the file holds allocates nothing.
    if values * u128::from(size) > bytes.len() as u128 {
        return Err(bad(format!(
            "the header says {shape:?} of {descr}, more than the file's {} bytes",
            bytes.len()
        )));
    }
    let fortran = npy.order() == npyz::Order::Fortran;
    let short = |e: std::io::Error| bad(format!("data: {e}"));
    let mut data: Vec<f32> = match size {
        4 => npy.into_vec::<f32>().map_err(short)?,
        8 => npy
            .into_vec::<f64>()
            .map_err(short)?
            .into_iter()
            .map(|x| x as f32)
            .collect(),
        _ => npy
            .into_vec::<half::f16>()
            .map_err(short)?
            .into_iter()
            .map(half::f16::to_f32)
            .collect(),
    };
    let shape: Vec<usize> = shape.iter().map(|&s| s as usize).collect();
    if fortran && shape.len() == 2 {
        // Column-major on disk: row r, column c is at c * rows + r.
        let (r, c) = (shape[0], shape[1]);
        data = (0..r * c).map(|i| data[(i % c) * r + i / c]).collect();
    }
    if fortran && shape.len() > 2 {
        return Err(Error::Import(ImportProblem::Rank {
            tensor: name.to_string(),
            shape,
        }));
    }
    Ok(Foreign {
        format: format!("numpy .npy {descr}"),
        tensors: vec![Tensor {
            name: name.to_string(),
            shape,
            data,
        }],
        meta: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `.npy` file as numpy writes it (`np.save`, format 1.0, 64-byte aligned header).
    fn npy(descr: &str, fortran: bool, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut h = format!(
            "{{'descr': '{descr}', 'fortran_order': {}, 'shape': {shape}, }}",
            if fortran { "True" } else { "False" }
        );
        while (10 + h.len() + 1) % 64 != 0 {
            h.push(' ');
        }
        h.push('\n');
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend((h.len() as u16).to_le_bytes());
        b.extend(h.as_bytes());
        b.extend(data);
        b
    }

    #[test]
    fn floats_of_each_width_and_order_read_exactly() {
        let f32s: Vec<u8> = [1.5f32, -2.0, 3.25, 4.0, 5.0, 6.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let t = &read(&npy("<f4", false, "(2, 3)", &f32s), "v")
            .unwrap()
            .tensors[0];
        assert_eq!(
            (t.shape.clone(), t.data.clone()),
            (vec![2, 3], vec![1.5, -2.0, 3.25, 4.0, 5.0, 6.0])
        );
        // The same matrix stored column-major reads back row-major.
        let cm: Vec<u8> = [1.5f32, 4.0, -2.0, 5.0, 3.25, 6.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let t = &read(&npy("<f4", true, "(2, 3)", &cm), "v").unwrap().tensors[0];
        assert_eq!(t.data, vec![1.5, -2.0, 3.25, 4.0, 5.0, 6.0]);
        let f64s: Vec<u8> = [0.1f64, 2.0].iter().flat_map(|x| x.to_be_bytes()).collect();
        let f = read(&npy(">f8", false, "(2,)", &f64s), "v").unwrap();
        assert_eq!(
            (f.format.as_str(), f.tensors[0].data.clone()),
            ("numpy .npy >f8", vec![0.1f32, 2.0])
        );
        let f16s: Vec<u8> = [half::f16::from_f32(0.5), half::f16::from_f32(-3.0)]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(
            read(&npy("<f2", false, "(2,)", &f16s), "v")
                .unwrap()
                .tensors[0]
                .data,
            vec![0.5, -3.0]
        );
    }

    #[test]
    fn bad_files_are_errors() {
        let e = |b: &[u8]| read(b, "v").unwrap_err().to_string();
        assert!(e(&npy("<i4", false, "(2,)", &[0; 8])).contains("dtype <i4, expected a float type"));
        assert!(e(&npy("<f4", false, "(10000, 1000)", &[0; 8])).contains("more than the file's"));
        assert!(e(&npy("<f4", false, "(100000, 100000)", &[0; 8]))
            .contains("more than any direction file"));
        assert!(e(b"PK\x03\x04").starts_with("not a .npy file"));
        let good = npy("<f4", false, "(2, 3)", &[0; 24]);
        for n in 0..good.len() {
            let _ = read(&good[..n], "v");
        }
        assert!(read(&good[..good.len() - 1], "v").is_err());
    }
}

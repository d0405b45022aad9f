//! Weight loading: safetensors tensors -> a [`LiteNet`], with batch norm folded into each
//! convolution, every tensor's dtype and shape checked, and nothing left unused.

use std::collections::HashMap;

use candle_core::{DType, Tensor};

use super::layers::{Block, DenseConv, Depthwise, pointwise};
use super::{Kernels, LiteNet};

/// Batch-norm epsilon of the TensorFlow Lite models.
pub(super) const BN_EPS: f64 = 1e-3;
/// Stride of the first block of each of the seven stages (EfficientNet-B0 layout).
pub(super) const STAGE_STRIDES: [usize; 7] = [1, 2, 2, 2, 1, 2, 1];

/// The weights file does not describe an EfficientNet-Lite network this loader understands.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("tensor {name:?} is missing")]
    Missing { name: String },
    #[error("tensor {name:?} has shape {actual:?}; expected {expected}")]
    Shape { name: String, actual: Vec<usize>, expected: String },
    #[error("tensor {name:?} has dtype {dtype:?}; expected f32")]
    DType { name: String, dtype: DType },
    #[error("no blocks found (`_blocks.N.*` tensors)")]
    NoBlocks,
    #[error("found {found} stages (channel changes between blocks); EfficientNet-Lite has 7")]
    Stages { found: usize },
    #[error("{count} tensors were not used, e.g. {example:?}")]
    Unused { count: usize, example: String },
    #[error("while preparing tensor {name:?}")]
    Candle {
        name: String,
        #[source]
        source: candle_core::Error,
    },
}

/// A convolution with batch norm folded in: weight `(out, in, k, k)` and bias `(out,)`.
#[derive(Debug, Clone)]
pub(super) struct Folded {
    pub(super) weight: Tensor,
    pub(super) bias: Tensor,
}

/// Removes named tensors from the loaded map, checking dtype and shape.
struct Tensors {
    map: HashMap<String, Tensor>,
}

impl Tensors {
    fn take(&mut self, name: &str) -> Result<Tensor, WeightsError> {
        let t = self.map.remove(name).ok_or_else(|| WeightsError::Missing { name: name.into() })?;
        if t.dtype() != DType::F32 {
            return Err(WeightsError::DType { name: name.into(), dtype: t.dtype() });
        }
        Ok(t)
    }

    fn take_shaped(&mut self, name: &str, expected: &[Option<usize>]) -> Result<Tensor, WeightsError> {
        let t = self.take(name)?;
        let dims = t.dims();
        let ok =
            dims.len() == expected.len() && dims.iter().zip(expected).all(|(d, e)| e.is_none_or(|e| e == *d));
        if !ok {
            let expected = expected
                .iter()
                .map(|e| e.map_or("_".to_string(), |v| v.to_string()))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(WeightsError::Shape {
                name: name.into(),
                actual: dims.to_vec(),
                expected: format!("[{expected}]"),
            });
        }
        Ok(t)
    }

    fn has(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    /// Loads `{conv}.weight` (shape `(out, in_per_group, k, k)`) and folds `{bn}` into it.
    fn conv_bn(&mut self, conv: &str, bn: &str, shape: [Option<usize>; 4]) -> Result<Folded, WeightsError> {
        let wname = format!("{conv}.weight");
        let weight = self.take_shaped(&wname, &shape)?;
        let out = weight.dims()[0];
        let vec = [Some(out)];
        let gamma = self.take_shaped(&format!("{bn}.weight"), &vec)?;
        let beta = self.take_shaped(&format!("{bn}.bias"), &vec)?;
        let mean = self.take_shaped(&format!("{bn}.running_mean"), &vec)?;
        let var = self.take_shaped(&format!("{bn}.running_var"), &vec)?;
        fold_bn(&weight, &gamma, &beta, &mean, &var)
            .map_err(|source| WeightsError::Candle { name: wname, source })
    }
}

/// `w' = w * g / sqrt(v + eps)`, `b' = beta - mean * g / sqrt(v + eps)`, computed in f64.
pub(super) fn fold_bn(
    weight: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
) -> candle_core::Result<Folded> {
    let f64s = |t: &Tensor| t.to_dtype(DType::F64);
    let scale = f64s(gamma)?.div(&(f64s(var)? + BN_EPS)?.sqrt()?)?;
    let out = weight.dims()[0];
    let w = f64s(weight)?.broadcast_mul(&scale.reshape((out, 1, 1, 1))?)?;
    let b = (f64s(beta)? - f64s(mean)?.mul(&scale)?)?;
    Ok(Folded { weight: w.to_dtype(DType::F32)?, bias: b.to_dtype(DType::F32)? })
}

impl LiteNet {
    /// Builds the network from safetensors tensors (on any device; folding runs where they are).
    /// Every tensor must be used, so a file of another architecture is refused.
    pub fn from_tensors(map: HashMap<String, Tensor>) -> Result<Self, WeightsError> {
        let mut ts = Tensors { map };
        let stem_dims = ts
            .map
            .get("_conv_stem.weight")
            .map(|t| t.dims().to_vec())
            .ok_or_else(|| WeightsError::Missing { name: "_conv_stem.weight".into() })?;
        let (stem_out, k) = match stem_dims[..] {
            [out, 3, k, k2] if k == k2 => (out, k),
            _ => {
                return Err(WeightsError::Shape {
                    name: "_conv_stem.weight".into(),
                    actual: stem_dims,
                    expected: "[_, 3, k, k]".into(),
                });
            }
        };
        let stem = ts.conv_bn("_conv_stem", "_bn0", [Some(stem_out), Some(3), Some(k), Some(k)])?;
        let stem = DenseConv::new(stem, 2)
            .map_err(|source| WeightsError::Candle { name: "_conv_stem.weight".into(), source })?;

        let mut blocks = Vec::new();
        let mut channels = stem_out;
        let mut stage = 0usize;
        let mut n = 0usize;
        while ts.has(&format!("_blocks.{n}._depthwise_conv.weight")) {
            let p = format!("_blocks.{n}");
            let expand = if ts.has(&format!("{p}._expand_conv.weight")) {
                let conv = ts.conv_bn(
                    &format!("{p}._expand_conv"),
                    &format!("{p}._bn0"),
                    [None, Some(channels), Some(1), Some(1)],
                )?;
                Some(conv)
            } else {
                None
            };
            let mid = expand.as_ref().map_or(channels, |e| e.weight.dims()[0]);
            let dw_name = format!("{p}._depthwise_conv.weight");
            let dw_kernel = ts.map.get(&dw_name).map_or(0, |t| t.dims().get(2).copied().unwrap_or(0));
            let depthwise = ts.conv_bn(
                &format!("{p}._depthwise_conv"),
                &format!("{p}._bn1"),
                [Some(mid), Some(1), Some(dw_kernel), Some(dw_kernel)],
            )?;
            let project = ts.conv_bn(
                &format!("{p}._project_conv"),
                &format!("{p}._bn2"),
                [None, Some(mid), Some(1), Some(1)],
            )?;
            let out = project.weight.dims()[0];
            let starts_stage = n == 0 || out != channels;
            if starts_stage && n > 0 {
                stage += 1;
            }
            let stride = if starts_stage {
                *STAGE_STRIDES.get(stage).ok_or(WeightsError::Stages { found: stage + 1 })?
            } else {
                1
            };
            let mut block = Block {
                expand: expand.map(pointwise).transpose().map_err(|source| WeightsError::Candle {
                    name: format!("{p}._expand_conv.weight"),
                    source,
                })?,
                depthwise: Depthwise::new(depthwise, stride)
                    .map_err(|source| WeightsError::Candle { name: dw_name.clone(), source })?,
                project: pointwise(project).map_err(|source| WeightsError::Candle {
                    name: format!("{p}._project_conv.weight"),
                    source,
                })?,
                residual: stride == 1 && out == channels,
                cpu: None,
            };
            block.cpu = block.cpu_block().map_err(|source| WeightsError::Candle { name: dw_name, source })?;
            blocks.push(block);
            channels = out;
            n += 1;
        }
        if blocks.is_empty() {
            return Err(WeightsError::NoBlocks);
        }
        if stage + 1 != STAGE_STRIDES.len() {
            return Err(WeightsError::Stages { found: stage + 1 });
        }

        let head = ts.conv_bn("_conv_head", "_bn1", [None, Some(channels), Some(1), Some(1)])?;
        let features = head.weight.dims()[0];
        let head = pointwise(head)
            .map_err(|source| WeightsError::Candle { name: "_conv_head.weight".into(), source })?;
        let fc_weight = ts.take_shaped("_fc.weight", &[None, Some(features)])?;
        let classes = fc_weight.dims()[0];
        let fc_bias = ts.take_shaped("_fc.bias", &[Some(classes)])?;
        let fc_weight_t = fc_weight
            .t()
            .and_then(|t| t.contiguous())
            .map_err(|source| WeightsError::Candle { name: "_fc.weight".into(), source })?;

        let mut left: Vec<&String> = ts.map.keys().collect();
        left.sort();
        if let Some(example) = left.first() {
            return Err(WeightsError::Unused { count: left.len(), example: (*example).clone() });
        }
        let kernels = Kernels::for_device(fc_bias.device());
        Ok(Self { stem, blocks, head, fc_weight_t, fc_bias, features, classes, kernels })
    }
}

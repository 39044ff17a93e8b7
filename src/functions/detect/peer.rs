//! `peer_outlier(x [, threshold]) OVER (PARTITION BY site)`: the sensor that disagrees with
//! its peers in the same window (a bird over one light sensor). An ordinary window function
//! over the rows DataFusion hands it (one window's, one partition's), so it keeps no state:
//! each row's value gets Iglewicz and Hoaglin's modified z-score against the median and
//! MAD of its partition. Fewer than three values in a partition: NULL (two sensors that
//! disagree cannot say which one is wrong).

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Float64Type};
use datafusion::common::{DataFusionError, Result, ScalarValue};
use datafusion::logical_expr::function::{PartitionEvaluatorArgs, WindowUDFFieldArgs};
use datafusion::logical_expr::{
    PartitionEvaluator, Signature, Volatility, WindowUDF, WindowUDFImpl,
};
use datafusion::physical_plan::expressions::Literal;

use super::models::{Verdict, robust_z, two_sided};

pub const NAME: &str = "peer_outlier";
/// The modified z-score from which a value is an outlier (Iglewicz and Hoaglin).
pub const DEFAULT_THRESHOLD: f64 = 3.5;

#[derive(Debug, PartialEq, Eq, Hash)]
pub struct PeerOutlier {
    signature: Signature,
}

pub fn udwf() -> WindowUDF {
    WindowUDF::new_from_impl(PeerOutlier {
        signature: Signature::variadic_any(Volatility::Immutable),
    })
}

impl WindowUDFImpl for PeerOutlier {
    fn name(&self) -> &str {
        NAME
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn partition_evaluator(
        &self,
        args: PartitionEvaluatorArgs,
    ) -> Result<Box<dyn PartitionEvaluator>> {
        let exprs = args.input_exprs();
        let threshold = match exprs.get(1) {
            None => DEFAULT_THRESHOLD,
            Some(e) => {
                let lit = e.downcast_ref::<Literal>().map(|l| l.value().clone());
                let v = lit.and_then(|v| v.cast_to(&DataType::Float64).ok());
                match v {
                    Some(ScalarValue::Float64(Some(t))) if t > 0.0 && t.is_finite() => t,
                    _ => {
                        return Err(DataFusionError::Plan(format!(
                            "{NAME}(value, threshold): the threshold is a positive number"
                        )));
                    }
                }
            }
        };
        if exprs.len() > 2 {
            return Err(DataFusionError::Plan(format!(
                "{NAME} takes a value and an optional threshold"
            )));
        }
        Ok(Box::new(Evaluator { threshold }))
    }

    fn field(&self, args: WindowUDFFieldArgs) -> Result<FieldRef> {
        if let Some(f) = args.input_fields().first()
            && !(f.data_type().is_numeric() || *f.data_type() == DataType::Null)
        {
            return Err(DataFusionError::Plan(format!(
                "{NAME} compares numbers, not {}",
                f.data_type()
            )));
        }
        Ok(Arc::new(Field::new(
            args.name(),
            super::verdict_type(),
            true,
        )))
    }
}

#[derive(Debug)]
struct Evaluator {
    threshold: f64,
}

impl PartitionEvaluator for Evaluator {
    fn evaluate_all(&mut self, values: &[ArrayRef], num_rows: usize) -> Result<ArrayRef> {
        let Some(col) = values.first() else {
            return Err(DataFusionError::Plan(format!("{NAME} needs a value")));
        };
        let col = cast(col, &DataType::Float64)?;
        let col = col.as_primitive::<Float64Type>();
        let peers: Vec<f64> = col.iter().flatten().filter(|v| v.is_finite()).collect();
        let out: Vec<Option<Verdict>> = (0..num_rows)
            .map(|i| {
                if peers.len() < 3 || !col.is_valid(i) || !col.value(i).is_finite() {
                    return None;
                }
                Some(two_sided(
                    robust_z(col.value(i), peers.iter().copied()),
                    self.threshold,
                ))
            })
            .collect();
        Ok(super::verdict_array(&out))
    }
}

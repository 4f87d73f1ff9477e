//! Model-based property tests of the engine: random sequences of write, trim, point,
//! clone, remove, gc and reopen, checked against "volume = Vec<u8>, point = copy".
//! The machinery is in `model_ops/` (tests/s3.rs runs it on an object store).

mod model_ops;

use model_ops::{op, run};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, max_shrink_iters: 200, ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_model(ops in prop::collection::vec(op(), 1..40)) {
        run(ops, false, None);
    }

    #[test]
    fn encrypted_engine_matches_model(ops in prop::collection::vec(op(), 1..25)) {
        run(ops, true, None);
    }
}

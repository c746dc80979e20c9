//! The in-flight byte budget of ingest (`INGEST_MAX_INFLIGHT_BYTES`), shared by every request.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::http::error::ApiError;

/// The bytes that ingest requests hold at once, across all of them (`INGEST_MAX_INFLIGHT_BYTES`):
/// bodies as they are read, their decoded text and their envelopes. A request that would pass
/// the bound is answered 503 with `Retry-After` (SDKs retry) instead of growing memory.
#[derive(Clone)]
pub struct InFlight(Arc<Semaphore>);

impl InFlight {
    pub fn new(bytes: usize) -> Self {
        Self(Arc::new(Semaphore::new(bytes.min(Semaphore::MAX_PERMITS))))
    }

    /// Holds `bytes` more, or answers 503 at once.
    pub fn hold(&self, bytes: usize) -> Result<Held, ApiError> {
        let mut held = Held {
            budget: self.0.clone(),
            permit: None,
            bytes: 0,
        };
        held.grow_to(bytes)?;
        Ok(held)
    }
}

/// Bytes one request holds in [`InFlight`], given back when it is dropped.
pub struct Held {
    budget: Arc<Semaphore>,
    permit: Option<OwnedSemaphorePermit>,
    bytes: usize,
}

impl Held {
    /// Holds `more` bytes beside those held already.
    pub fn grow(&mut self, more: usize) -> Result<(), ApiError> {
        self.grow_to(self.bytes + more)
    }

    /// Holds at least `bytes` in all.
    pub fn grow_to(&mut self, bytes: usize) -> Result<(), ApiError> {
        let Some(more) = bytes.checked_sub(self.bytes).filter(|&n| n > 0) else {
            return Ok(());
        };
        let busy = || {
            ApiError::unavailable(
                "ingest_busy",
                "the api is holding as many request bytes as it may (INGEST_MAX_INFLIGHT_BYTES): send again shortly",
                1,
            )
        };
        let more_u32 = u32::try_from(more).map_err(|_| busy())?;
        let permit = self
            .budget
            .clone()
            .try_acquire_many_owned(more_u32)
            .map_err(|_| busy())?;
        match &mut self.permit {
            Some(held) => held.merge(permit),
            None => self.permit = Some(permit),
        }
        self.bytes = bytes;
        Ok(())
    }
}

//! Graceful shutdown: one signal that every task of the server can wait on.

/// Signals shutdown to every clone.
#[derive(Clone)]
pub struct CancelToken {
    rx: tokio::sync::watch::Receiver<bool>,
}

/// The sending half, held by whoever decides to stop.
pub struct CancelHandle {
    tx: tokio::sync::watch::Sender<bool>,
}

/// Makes a handle and a token.
pub fn cancel_pair() -> (CancelHandle, CancelToken) {
    let (tx, rx) = tokio::sync::watch::channel(false);
    (CancelHandle { tx }, CancelToken { rx })
}

impl CancelHandle {
    /// Cancels every token.
    pub fn cancel(&self) {
        let _ = self.tx.send(true);
    }
    /// A new token bound to this handle.
    pub fn token(&self) -> CancelToken {
        CancelToken {
            rx: self.tx.subscribe(),
        }
    }
}

impl CancelToken {
    /// Resolves once cancelled (or once the handle is dropped).
    pub async fn cancelled(&mut self) {
        let _ = self.rx.wait_for(|v| *v).await;
    }
}

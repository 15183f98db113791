//! Transport limits and timeouts, with defaults tuned for a LAN.

use std::time::Duration;

use crate::error::EndpointError;

/// Limits and timeouts of an endpoint. The defaults suit a LAN; every field can be changed.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// Largest frame (RPC message or record batch) accepted, in bytes.
    pub max_frame_bytes: u32,
    /// Concurrent bidirectional streams (in-flight calls) a peer may open.
    pub max_concurrent_calls: u32,
    /// Concurrent unidirectional streams (data-plane edges) a peer may open.
    pub max_concurrent_data_streams: u32,
    /// A connection with no traffic for this long is closed.
    pub idle_timeout: Duration,
    /// Keep-alive interval; must be below `idle_timeout`.
    pub keep_alive: Duration,
    /// Per-stream receive window (bytes in flight per stream).
    pub stream_receive_window: u32,
    /// Per-connection receive window: caps memory per connection.
    pub receive_window: u32,
    /// Per-connection send window.
    pub send_window: u64,
    /// Requested UDP socket send and receive buffer size.
    pub udp_buffer_bytes: usize,
    /// Longest time a connection attempt (handshake and hello) may take.
    pub connect_timeout: Duration,
    /// Deadline used by calls that do not name one.
    pub default_call_timeout: Duration,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            max_frame_bytes: 16 << 20,
            max_concurrent_calls: 1024,
            max_concurrent_data_streams: 256,
            idle_timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(2),
            stream_receive_window: 2 << 20,
            receive_window: 16 << 20,
            send_window: 16 << 20,
            udp_buffer_bytes: 4 << 20,
            connect_timeout: Duration::from_secs(3),
            default_call_timeout: Duration::from_secs(3),
        }
    }
}

impl TransportConfig {
    /// Checks that the values are usable.
    pub fn validate(&self) -> Result<(), EndpointError> {
        let bad = |m: String| Err(EndpointError::Config(m));
        if self.max_frame_bytes < 64 {
            return bad(format!(
                "max_frame_bytes must be at least 64, got {}",
                self.max_frame_bytes
            ));
        }
        if self.max_concurrent_calls == 0 {
            return bad("max_concurrent_calls must be at least 1".into());
        }
        if self.keep_alive >= self.idle_timeout {
            return bad(format!(
                "keep_alive ({:?}) must be shorter than idle_timeout ({:?})",
                self.keep_alive, self.idle_timeout
            ));
        }
        if self.connect_timeout.is_zero() || self.default_call_timeout.is_zero() {
            return bad("connect_timeout and default_call_timeout must be positive".into());
        }
        Ok(())
    }

    pub(crate) fn quinn(&self) -> Result<quinn::TransportConfig, EndpointError> {
        let mut t = quinn::TransportConfig::default();
        let idle = quinn::IdleTimeout::try_from(self.idle_timeout)
            .map_err(|e| EndpointError::Config(format!("idle_timeout: {e}")))?;
        t.max_idle_timeout(Some(idle))
            .keep_alive_interval(Some(self.keep_alive))
            .max_concurrent_bidi_streams(self.max_concurrent_calls.into())
            .max_concurrent_uni_streams(self.max_concurrent_data_streams.into())
            .stream_receive_window(self.stream_receive_window.into())
            .receive_window(self.receive_window.into())
            .send_window(self.send_window);
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        TransportConfig::default().validate().unwrap();
    }

    #[test]
    fn keep_alive_must_be_below_idle_timeout() {
        let cfg = TransportConfig {
            keep_alive: Duration::from_secs(20),
            ..Default::default()
        };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("keep_alive"), "{err}");
    }
}

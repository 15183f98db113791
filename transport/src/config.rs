//! Transport limits and timeouts, with defaults tuned for a LAN.

use std::sync::Arc;
use std::time::Duration;

use crate::error::EndpointError;

/// Longest acknowledgement delay [`TransportConfig::ack_frequency`] may ask for (QUIC caps the
/// delay a peer applies at 25 ms or the RTT anyway).
pub const MAX_ACK_DELAY: Duration = Duration::from_millis(25);

/// Smallest allowed [`TransportConfig::initial_window`]: two full-size datagrams.
pub const MIN_INITIAL_WINDOW: u64 = 2 * 1500;

/// Smallest allowed [`TransportConfig::max_udp_payload`]: QUIC's minimum datagram size.
pub const MIN_UDP_PAYLOAD: u16 = 1200;

/// Largest allowed [`TransportConfig::max_udp_payload`]. quinn sends up to 10 datagrams in
/// one segmentation-offload (GSO) batch, which the kernel caps at 64 KiB in total; larger
/// datagrams make every batch fail to send (a fixed 8,952-byte MTU measured 91 k
/// records/s unthrottled instead of 1.48 M).
pub const MAX_UDP_PAYLOAD: u16 = 6500;

/// [`TransportConfig::max_udp_payload`] of [`TransportConfig::data_plane`]. On a loopback
/// (or jumbo-frame) path a datagram then carries ~57 records of 104 bytes instead of ~13:
/// the sending executor's CPU at maximum rate fell by ~40 % and a local cluster's capacity
/// rose from 1.57–1.79 M to 1.86–2.02 M records/s (interleaved runs). On a 1,500-byte path
/// discovery stays at that path's MTU.
pub const DATA_PLANE_UDP_PAYLOAD: u16 = 6000;

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
    /// Per-connection receive window: how many bytes of all its streams a peer may have in
    /// flight. Bytes a handler has read (a call's request, a data stream's frames) no longer
    /// count, so it bounds what is buffered in QUIC, not what the handlers hold.
    pub receive_window: u32,
    /// Per-connection send window.
    pub send_window: u64,
    /// Requested UDP socket send and receive buffer size.
    pub udp_buffer_bytes: usize,
    /// Longest time a connection attempt (handshake and hello) may take.
    pub connect_timeout: Duration,
    /// Deadline used by calls that do not name one.
    pub default_call_timeout: Duration,
    /// How long a request (or a data stream's header) may take to arrive whole once its
    /// stream is open; a peer that opens streams and then stalls holds nothing past it.
    pub request_read_timeout: Duration,
    /// Acknowledgement frequency this endpoint asks its peers for (QUIC ACK-frequency
    /// extension); `None` keeps QUIC's default of an ACK for every second packet.
    pub ack_frequency: Option<AckFrequency>,
    /// Congestion window of a new connection, in bytes (`None`: quinn's default, ~14 KB).
    pub initial_window: Option<u64>,
    /// Largest UDP payload this endpoint accepts and probes for, in bytes
    /// ([`MIN_UDP_PAYLOAD`]..=[`MAX_UDP_PAYLOAD`]). Connections start at 1,200 bytes and path
    /// MTU discovery raises them up to the smaller of both ends' values, backing off when a
    /// probe is lost, so a value above the path's MTU is safe. Default 1,472 (an Ethernet
    /// MTU of 1,500).
    pub max_udp_payload: u16,
}

/// How often a peer acknowledges: after more than `packets` ack-eliciting packets, or
/// `max_delay` after the first unacknowledged one, whichever comes first.
///
/// Every ACK is a datagram the receiver sends and the sender processes; on a busy one-way
/// data stream QUIC's default (every second packet) makes that a third of all datagrams.
/// Loss is still detected: an out-of-order packet is acknowledged at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckFrequency {
    /// Ack-eliciting packets a peer may receive before it must acknowledge.
    pub packets: u32,
    /// Longest a peer may delay an acknowledgement.
    pub max_delay: Duration,
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
            request_read_timeout: Duration::from_secs(10),
            ack_frequency: None,
            initial_window: None,
            max_udp_payload: 1472,
        }
    }
}

impl TransportConfig {
    /// The defaults, tuned for bulk one-way record streams between executors: peers are asked
    /// to acknowledge every 64 packets or after 1 ms, a connection starts with a 1 MiB
    /// congestion window (a LAN peer needs no slow start), and path MTU discovery may raise
    /// datagrams to [`DATA_PLANE_UDP_PAYLOAD`] bytes. Control traffic keeps
    /// [`TransportConfig::default`], whose replies carry their acknowledgements.
    pub fn data_plane() -> Self {
        Self {
            ack_frequency: Some(AckFrequency {
                packets: 64,
                max_delay: Duration::from_millis(1),
            }),
            initial_window: Some(1 << 20),
            max_udp_payload: DATA_PLANE_UDP_PAYLOAD,
            ..Self::default()
        }
    }

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
        if self.request_read_timeout.is_zero() {
            return bad("request_read_timeout must be above zero".into());
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
        if let Some(ack) = self.ack_frequency
            && (ack.packets == 0 || ack.max_delay.is_zero() || ack.max_delay > MAX_ACK_DELAY)
        {
            return bad(format!(
                "ack_frequency needs 1 or more packets and a delay in (0, {MAX_ACK_DELAY:?}], got {} packets and {:?}",
                ack.packets, ack.max_delay
            ));
        }
        if !(MIN_UDP_PAYLOAD..=MAX_UDP_PAYLOAD).contains(&self.max_udp_payload) {
            return bad(format!(
                "max_udp_payload must be between {MIN_UDP_PAYLOAD} and {MAX_UDP_PAYLOAD} bytes, got {}",
                self.max_udp_payload
            ));
        }
        if self.initial_window.is_some_and(|w| w < MIN_INITIAL_WINDOW) {
            return bad(format!(
                "initial_window must be at least {MIN_INITIAL_WINDOW} bytes, got {:?}",
                self.initial_window
            ));
        }
        Ok(())
    }

    /// The endpoint settings, with `keys` (the key of the stateless resets it sends and the
    /// one of the connection ids it issues: see [`crate::tls::Identity::reset_key`] and
    /// [`crate::tls::Identity::cid_key`]) or, without, quinn's random ones.
    pub(crate) fn quinn_endpoint(
        &self,
        keys: Option<(ring::hmac::Key, u64)>,
    ) -> Result<quinn::EndpointConfig, EndpointError> {
        let mut endpoint = match keys {
            Some((reset_key, cid_key)) => {
                let mut endpoint = quinn::EndpointConfig::new(std::sync::Arc::new(reset_key));
                endpoint.cid_generator(move || {
                    Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
                });
                endpoint
            }
            None => quinn::EndpointConfig::default(),
        };
        endpoint
            .max_udp_payload_size(self.max_udp_payload)
            .map_err(|e| EndpointError::Config(format!("max_udp_payload: {e}")))?;
        Ok(endpoint)
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
        if let Some(ack) = self.ack_frequency {
            let mut frequency = quinn::AckFrequencyConfig::default();
            // Reordering threshold 1: a packet that arrives out of order is acknowledged at
            // once (as without the extension), so a loss is still noticed quickly.
            frequency
                .ack_eliciting_threshold(ack.packets.into())
                .max_ack_delay(Some(ack.max_delay))
                .reordering_threshold(1u32.into());
            t.ack_frequency_config(Some(frequency));
        }
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(self.max_udp_payload);
        t.mtu_discovery_config(Some(mtu));
        if let Some(window) = self.initial_window {
            let mut cubic = quinn::congestion::CubicConfig::default();
            cubic.initial_window(window);
            t.congestion_controller_factory(Arc::new(cubic));
        }
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
    fn data_plane_preset_is_valid_and_builds() {
        let cfg = TransportConfig::data_plane();
        cfg.validate().unwrap();
        cfg.quinn().unwrap();
    }

    #[test]
    fn bad_ack_frequency_and_window_are_refused() {
        for ack in [
            AckFrequency {
                packets: 0,
                max_delay: Duration::from_millis(1),
            },
            AckFrequency {
                packets: 4,
                max_delay: Duration::ZERO,
            },
            AckFrequency {
                packets: 4,
                max_delay: Duration::from_secs(1),
            },
        ] {
            let cfg = TransportConfig {
                ack_frequency: Some(ack),
                ..Default::default()
            };
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains("ack_frequency"), "{err}");
        }
        let cfg = TransportConfig {
            initial_window: Some(100),
            ..Default::default()
        };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("initial_window"), "{err}");
    }

    #[test]
    fn udp_payload_outside_quic_minimum_and_gso_limit_is_refused() {
        for bad in [0, MIN_UDP_PAYLOAD - 1, MAX_UDP_PAYLOAD + 1, u16::MAX] {
            let cfg = TransportConfig {
                max_udp_payload: bad,
                ..Default::default()
            };
            let err = cfg.validate().unwrap_err().to_string();
            assert!(
                err.contains("max_udp_payload") && err.contains(&bad.to_string()),
                "{err}"
            );
        }
        for good in [
            MIN_UDP_PAYLOAD,
            1472,
            DATA_PLANE_UDP_PAYLOAD,
            MAX_UDP_PAYLOAD,
        ] {
            let cfg = TransportConfig {
                max_udp_payload: good,
                ..Default::default()
            };
            cfg.validate().unwrap();
            cfg.quinn_endpoint(Some((
                ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"k"),
                7,
            )))
            .unwrap();
        }
        // Ten GSO segments must fit the kernel's 64 KiB limit.
        assert!(10 * usize::from(MAX_UDP_PAYLOAD) <= 65_507);
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

//! A nameserver the tests control: UDP on the loopback, answering A
//! queries for the names it was given (AAAA queries get no records), with
//! NXDOMAIN, SERVFAIL or silence when told to.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;

/// How a name is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// NOERROR with these A records (none: no addresses).
    Addresses(Vec<Ipv4Addr>),
    /// The name does not exist.
    NxDomain,
    /// The server fails (SERVFAIL).
    ServFail,
    /// The A query fails (SERVFAIL) while AAAA answers, with no records
    /// (what an IPv4-only name has): one lost query.
    AFails,
    /// No answer at all.
    Silent,
}

pub struct TestDns {
    pub addr: SocketAddr,
    names: Arc<Mutex<HashMap<String, Reply>>>,
    /// Queries received, by name.
    asked: Arc<Mutex<HashMap<String, u64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TestDns {
    pub async fn start() -> TestDns {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("a UDP socket");
        let addr = socket.local_addr().expect("its address");
        let names: Arc<Mutex<HashMap<String, Reply>>> = Arc::default();
        let asked: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
        let (n, a) = (names.clone(), asked.clone());
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 1500];
            loop {
                let Ok((len, from)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                let Some((name, qtype, question_end)) = question(&buf[..len]) else {
                    continue;
                };
                *a.lock().unwrap().entry(name.clone()).or_default() += 1;
                let reply = n
                    .lock()
                    .unwrap()
                    .get(&name)
                    .cloned()
                    .unwrap_or(Reply::NxDomain);
                let (rcode, records) = match reply {
                    Reply::Silent => continue,
                    Reply::NxDomain => (3, Vec::new()),
                    Reply::ServFail => (2, Vec::new()),
                    Reply::AFails if qtype == 1 => (2, Vec::new()),
                    Reply::AFails => (0, Vec::new()),
                    Reply::Addresses(_) if qtype != 1 => (0, Vec::new()),
                    Reply::Addresses(ips) => (0, ips),
                };
                let mut out = buf[..question_end].to_vec();
                out[2] = 0x81; // an answer, recursion desired
                out[3] = 0x80 | rcode; // recursion available
                out[6..8].copy_from_slice(&(records.len() as u16).to_be_bytes());
                out[8..12].copy_from_slice(&[0, 0, 0, 0]);
                for ip in records {
                    out.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4]);
                    out.extend_from_slice(&ip.octets());
                }
                let _ = socket.send_to(&out, from).await;
            }
        });
        TestDns {
            addr,
            names,
            asked,
            task,
        }
    }

    /// From now on, `name` is answered so.
    pub fn set(&self, name: &str, reply: Reply) {
        self.names.lock().unwrap().insert(name.to_string(), reply);
    }

    /// How many queries for `name` came (A and AAAA each count).
    pub fn asked(&self, name: &str) -> u64 {
        self.asked.lock().unwrap().get(name).copied().unwrap_or(0)
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The name and type asked, and where the question ends.
fn question(msg: &[u8]) -> Option<(String, u16, usize)> {
    if msg.len() < 12 || msg[2] & 0x80 != 0 || msg[4..6] != [0, 1] {
        return None;
    }
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*msg.get(at)?);
        if len == 0 {
            at += 1;
            break;
        }
        labels.push(String::from_utf8_lossy(msg.get(at + 1..at + 1 + len)?).to_lowercase());
        at += 1 + len;
    }
    let qtype = u16::from_be_bytes([*msg.get(at)?, *msg.get(at + 1)?]);
    Some((labels.join("."), qtype, at + 4))
}

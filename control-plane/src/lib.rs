//! placeholder
use etcd_client as _;

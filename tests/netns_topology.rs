//! The test network itself: namespaces come up wired as documented and go away on drop, so
//! data-plane tests can trust their plumbing.

use wardgate::netns::Topology;

#[test]
fn topology_wires_client_gateway_and_resource_and_cleans_up() {
    let names;
    {
        let t = Topology::new(201).expect("topology");
        names = [
            t.client.name.clone(),
            t.gateway.name.clone(),
            t.resource.name.clone(),
        ];
        // The gateway reaches both sides; the client cannot reach the resource network at all
        // (no route): without a tunnel, nothing is reachable.
        t.gateway
            .exec(&["ping", "-c1", "-W2", "10.99.201.2"])
            .expect("gateway to client");
        t.gateway
            .exec(&["ping", "-c1", "-W2", "10.10.1.11"])
            .expect("gateway to resource");
        assert!(
            t.client
                .exec(&["ping", "-c1", "-W1", "10.10.1.10"])
                .is_err()
        );
    }
    let list = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip");
    let list = String::from_utf8_lossy(&list.stdout);
    for n in names {
        assert!(!list.contains(&n), "{n} was not deleted");
    }
}

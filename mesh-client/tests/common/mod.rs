//! A 3-server mesh of the tiny model on loopback, and a client joined to it.

use mesh_client::MeshClient;
use mesh_core::local_mesh::LocalMesh;
use mesh_core::model::tiny;
use mesh_core::BlockRange;

pub struct Running {
    pub dir: tempfile::TempDir,
    pub mesh: LocalMesh,
    pub client: MeshClient,
}

pub async fn three_node_mesh() -> Running {
    let dir = tempfile::tempdir().unwrap();
    tiny::write(dir.path()).unwrap();
    let mesh = LocalMesh::start(dir.path(), &BlockRange::even_split(8, 3))
        .await
        .unwrap();
    let client = MeshClient::builder()
        .bootstrap([mesh.bootstrap_addr().clone()])
        .model_dir(dir.path())
        .build()
        .await
        .unwrap();
    Running { dir, mesh, client }
}

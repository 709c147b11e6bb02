

def test_integer_onnx_export_writes_the_linear_layers_as_matmulinteger(tmp_path):
    """The engine's GEMMs export as ONNX ``MatMulInteger`` (int8 x int8 -> int32), one per linear
    layer and the patch embedding, and ONNX Runtime reproduces the model within the export's
    tolerance at another batch size than the trace's."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    import policysearch as ps
    from policysearch.deploy.onnx_export import compare_onnx, export_integer
    from policysearch.models.tiny import tiny_vit
    from policysearch.policy import Policy

    torch.manual_seed(0)
    model = ps.prepare(tiny_vit())
    x = torch.randn(6, 3, 32, 32)
    ps.calibrate(model, [x])
    ps.apply_policy(model, Policy.uniform(ps.find_sites(model), "ivit"))
    path = export_integer(model, tmp_path / "int.onnx", x[:2])
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    n_gemm = sum(isinstance(m, (IntLinear, IntConv2d)) for m in model.modules())
    assert ops.count("MatMulInteger") == n_gemm
    agree = compare_onnx(path, model, x, batch_size=6)
    assert agree.ok, agree

"""pytest: nbval runs each notebook as git stores it, without outputs. JupyterLab's autosave writes outputs and
execution counts into the working tree; nbval would take them as the expected outputs of NBVAL_CHECK_OUTPUT cells."""


def pytest_collection_modifyitems(items):
    for item in items:
        cell = getattr(item, "cell", None)
        if type(item).__name__ == "IPyNbCell" and cell is not None and cell.get("cell_type") == "code":
            cell.outputs, cell.execution_count = [], None

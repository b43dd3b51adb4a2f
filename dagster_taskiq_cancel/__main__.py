from dagster_taskiq_cancel.cli import main

main()

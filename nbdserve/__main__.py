from nbdserve.cli import main

raise SystemExit(main())

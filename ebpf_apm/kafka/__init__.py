"""The Kafka edge: what the agent and the consumers both need of Kafka, owned by neither.

    connection   --bootstrap-servers and $KAFKA_BOOTSTRAP_SERVERS -> KafkaConnection
    security     TLS and SASL flags and KAFKA_* environment -> KafkaSecurity (in the connection)
    handshake    why a client could not start: the TLS or SASL failure, told apart from an outage
    topics       every topic name and default partition count, in one place
    clients      aiokafka clients built from a connection, with the project's tuning
    admin        topic creation and partition counts
    deadletter   what a rejected input message becomes on apm.deadletter
    errors       the edge's exceptions and how a Kafka error is described to a user
    embedded_broker  `ebpf-apm broker`: Tansu for tests, the demo and a laptop

The agent's buffered publisher (ebpf_apm.producer.kafka_publisher) and the consumers' group
input and acknowledged output (ebpf_apm.consumers.kafka_io) build on these modules.
"""
